// Package conformance runs containerd's snapshotter conformance suite
// (github.com/containerd/containerd/snapshots/testsuite, containerd 1.6) against thinsnap over
// its unix socket, exactly as containerd talks to a proxy snapshotter plugin.
//
// Every subtest of the suite gets a fresh thinsnap: its own config, state dir, socket, loop-backed
// thin pool with a unique name, and its own log file. The config and the socket live in the root
// dir the suite gives us; the state dir (sled database, sparse pool files) lives beside it, in
// $TMPDIR/thinsnap-conformance/POOL, because on a failed subtest the suite dumps its whole temp
// dir, reading every file in full: a 2 GiB sparse pool file per failing subtest runs the VM out of
// memory. The cleanup stops thinsnap with SIGTERM and
// runs `thinsnap pool destroy --remove-files`, and checks that no dm device or loop device of the
// pool is left behind.
//
// Build on the host (GOPATH mode, no network): integration/conformance/build.sh
// Run inside the VM, as root:
//
//	THINSNAP_BIN=target/debug/thinsnap conformance.test -test.root -test.v -test.parallel=2
//
// Environment:
//
//	THINSNAP_BIN                 thinsnap binary (required; made absolute)
//	CONFORMANCE_LOGDIR           where the per-subtest thinsnap logs go (default: a temp dir)
//	CONFORMANCE_FS               ext4 (default) or xfs
//	CONFORMANCE_START_TIMEOUT    how long to wait for the socket (Go duration, default 3m)
//	CONFORMANCE_STOP_TIMEOUT     how long to wait for exit after SIGTERM (default 1m)
//	RUST_LOG                     passed to thinsnap (default "info,thinsnap=debug")
package conformance

import (
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"regexp"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
	"unsafe"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/defaults"
	"github.com/containerd/containerd/log"
	"github.com/containerd/containerd/pkg/dialer"
	"github.com/containerd/containerd/pkg/testutil"
	"github.com/containerd/containerd/snapshots"
	"github.com/containerd/containerd/snapshots/proxy"
	"github.com/containerd/containerd/snapshots/testsuite"
	"github.com/moby/sys/mountinfo"
	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
)

const snapshotterName = "thinsnap"

var (
	instanceCounter int64

	logDir     string
	logDirOnce sync.Once

	resultsMu sync.Mutex
	results   = map[string]string{} // subtest name -> "pass", "fail" or "skip"
)

func TestMain(m *testing.M) {
	flag.Parse()
	start := time.Now()
	code := m.Run()
	printSummary(time.Since(start))
	os.Exit(code)
}

func printSummary(elapsed time.Duration) {
	resultsMu.Lock()
	defer resultsMu.Unlock()
	if len(results) == 0 {
		fmt.Printf("conformance: no subtest results recorded (suite skipped? run with -test.root as root); took %s\n",
			elapsed.Round(time.Second))
		return
	}
	var passed, failed, skipped []string
	for name, r := range results {
		switch r {
		case "pass":
			passed = append(passed, name)
		case "skip":
			skipped = append(skipped, name)
		default:
			failed = append(failed, name)
		}
	}
	sort.Strings(failed)
	fmt.Printf("\nconformance summary: %d subtests passed, %d failed, %d skipped; suite took %s\n",
		len(passed), len(failed), len(skipped), elapsed.Round(time.Second))
	for _, name := range failed {
		fmt.Printf("conformance: FAILED %s\n", name)
	}
	if logDir != "" {
		fmt.Printf("conformance: thinsnap logs in %s\n", logDir)
	}
}

func TestThinsnapConformance(t *testing.T) {
	testutil.RequiresRoot(t)
	bin := os.Getenv("THINSNAP_BIN")
	if bin == "" {
		t.Fatal("THINSNAP_BIN must name the thinsnap binary")
	}
	if _, err := os.Stat(bin); err != nil {
		t.Fatalf("THINSNAP_BIN: %v", err)
	}
	testsuite.SnapshotterSuite(t, snapshotterName, newThinsnap)
}

// instance is one running `thinsnap serve`.
type instance struct {
	tb      testing.TB // the subtest, when it could be found (see tbFromContext)
	label   string
	bin     string
	config  string
	root    string
	state   string
	sock    string
	pool    string
	logPath string
	logFile *os.File
	cmd     *exec.Cmd
	exited  chan struct{}
	waitErr error
	conn    *grpc.ClientConn
}

func newThinsnap(ctx context.Context, root string) (snapshots.Snapshotter, func() error, error) {
	bin, err := filepath.Abs(os.Getenv("THINSNAP_BIN"))
	if err != nil {
		return nil, nil, err
	}
	n := atomic.AddInt64(&instanceCounter, 1)
	in := &instance{
		tb:     tbFromContext(ctx),
		bin:    bin,
		root:   root,
		config: filepath.Join(root, "thinsnap.toml"),
		sock:   filepath.Join(root, "thinsnap.sock"),
		// dm names must be unique among all pools running at once in this kernel
		pool: fmt.Sprintf("thinsnap-ct%d-%d", os.Getpid(), n),
	}
	// thinsnap creates its root itself (and insists on root:root 0700 if it exists).
	in.state = filepath.Join(os.TempDir(), "thinsnap-conformance", in.pool)
	if err := os.MkdirAll(filepath.Dir(in.state), 0o755); err != nil {
		return nil, nil, err
	}
	in.label = fmt.Sprintf("%03d", n)
	if tb := in.tb; tb != nil {
		in.label += "-" + sanitize(strings.TrimPrefix(tb.Name(), "TestThinsnapConformance/"))
		// Runs once the subtest and all its defers (our cleanup included) are done.
		tb.Cleanup(func() {
			r := "pass"
			if tb.Failed() {
				r = "fail"
			} else if tb.Skipped() {
				r = "skip"
			}
			resultsMu.Lock()
			results[tb.Name()] = r
			resultsMu.Unlock()
		})
	}

	fsType := os.Getenv("CONFORMANCE_FS")
	if fsType == "" {
		fsType = "ext4"
	}
	cfg := fmt.Sprintf(`# written by the conformance harness
root = %q
address = %q

[pool]
name = %q
mode = "loop"
data_size = "2GiB"
metadata_size = "64MiB"
block_size = "64KiB"

[fs]
type = %q
base_size = "256MiB"
`, in.state, in.sock, in.pool, fsType)
	if err := os.WriteFile(in.config, []byte(cfg), 0o644); err != nil {
		return nil, nil, err
	}

	in.logPath = filepath.Join(getLogDir(), in.label+".log")
	in.logFile, err = os.OpenFile(in.logPath, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o644)
	if err != nil {
		return nil, nil, err
	}
	if in.tb != nil {
		in.tb.Logf("thinsnap instance %s: pool %s, config %s, log %s", in.label, in.pool, in.config, in.logPath)
	}

	in.cmd = exec.Command(bin, "serve", "--config", in.config)
	in.cmd.Stdout = in.logFile
	in.cmd.Stderr = in.logFile
	in.cmd.Env = os.Environ()
	if os.Getenv("RUST_LOG") == "" {
		in.cmd.Env = append(in.cmd.Env, "RUST_LOG=info,thinsnap=debug")
	}
	in.cmd.Env = append(in.cmd.Env, "RUST_BACKTRACE=1", "NO_COLOR=1")
	// If this test binary dies, do not leave a daemon behind.
	in.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGTERM}
	started := time.Now()
	if err := in.cmd.Start(); err != nil {
		in.logFile.Close()
		return nil, nil, fmt.Errorf("start %s: %w", bin, err)
	}
	in.exited = make(chan struct{})
	go func() {
		in.waitErr = in.cmd.Wait()
		close(in.exited)
	}()

	if err := in.waitForSocket(envDuration("CONFORMANCE_START_TIMEOUT", 3*time.Minute)); err != nil {
		in.stop()
		_ = in.destroy()
		in.logFile.Close()
		return nil, nil, fmt.Errorf("%w\n%s", err, in.logText())
	}
	if in.tb != nil {
		in.tb.Logf("thinsnap instance %s ready after %s", in.label, time.Since(started).Round(time.Millisecond))
	}

	backoffConfig := backoff.DefaultConfig
	backoffConfig.MaxDelay = 3 * time.Second
	// The same dial options containerd 1.6 uses for proxy plugins (services/server/server.go).
	dialCtx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	in.conn, err = grpc.DialContext(dialCtx, dialer.DialAddress(in.sock),
		grpc.WithInsecure(),
		grpc.WithConnectParams(grpc.ConnectParams{Backoff: backoffConfig}),
		grpc.WithContextDialer(dialer.ContextDialer),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(defaults.DefaultMaxRecvMsgSize)),
		grpc.WithDefaultCallOptions(grpc.MaxCallSendMsgSize(defaults.DefaultMaxSendMsgSize)),
		grpc.WithBlock(),
	)
	if err != nil {
		in.stop()
		_ = in.destroy()
		in.logFile.Close()
		return nil, nil, fmt.Errorf("dial %s: %w\n%s", in.sock, err, in.logText())
	}

	sn := proxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(in.conn), snapshotterName)
	return sn, in.cleanup, nil
}

func (in *instance) waitForSocket(timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		if fi, err := os.Stat(in.sock); err == nil && fi.Mode()&os.ModeSocket != 0 {
			return nil
		}
		select {
		case <-in.exited:
			return fmt.Errorf("thinsnap serve exited before creating its socket %s: %v", in.sock, in.waitErr)
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("thinsnap serve did not create its socket %s within %s", in.sock, timeout)
		}
	}
}

// stop sends SIGTERM and waits; SIGKILL if it does not exit in time. Returns an error unless the
// daemon exited by itself with status 0.
func (in *instance) stop() error {
	select {
	case <-in.exited:
		return fmt.Errorf("thinsnap serve had already exited before SIGTERM: %v", in.waitErr)
	default:
	}
	if err := in.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		return fmt.Errorf("SIGTERM thinsnap: %w", err)
	}
	timeout := envDuration("CONFORMANCE_STOP_TIMEOUT", time.Minute)
	select {
	case <-in.exited:
		if in.waitErr != nil {
			return fmt.Errorf("thinsnap serve exited with %v after SIGTERM", in.waitErr)
		}
		return nil
	case <-time.After(timeout):
		_ = in.cmd.Process.Kill()
		<-in.exited
		return fmt.Errorf("thinsnap serve did not exit within %s of SIGTERM (killed)", timeout)
	}
}

// destroy runs `thinsnap pool destroy --remove-files` and checks that nothing of the pool is left.
func (in *instance) destroy() error {
	cmd := exec.Command(in.bin, "pool", "destroy", "--config", in.config, "--remove-files")
	cmd.Env = append(os.Environ(), "NO_COLOR=1")
	out, err := cmd.CombinedOutput()
	fmt.Fprintf(in.logFile, "\n---- harness: thinsnap pool destroy --remove-files (%v)\n%s", err, out)
	if err != nil {
		return fmt.Errorf("thinsnap pool destroy --remove-files: %v\n%s", err, out)
	}
	var leftovers []string
	if names, _ := filepath.Glob("/sys/block/dm-*/dm/name"); names != nil {
		for _, p := range names {
			b, err := os.ReadFile(p)
			if err != nil {
				continue
			}
			name := strings.TrimSpace(string(b))
			// thin devices are named from a prefix we do not know; the pool name we do
			if name == in.pool || strings.HasPrefix(name, in.pool+"-") {
				leftovers = append(leftovers, "dm device "+name)
			}
		}
	}
	if files, _ := filepath.Glob("/sys/block/loop*/loop/backing_file"); files != nil {
		for _, p := range files {
			b, err := os.ReadFile(p)
			if err != nil {
				continue
			}
			backing := strings.TrimSpace(string(b))
			if strings.HasPrefix(backing, in.state+"/") {
				leftovers = append(leftovers, fmt.Sprintf("loop device %s -> %s", strings.Split(p, "/")[3], backing))
			}
		}
	}
	if entries, err := os.ReadDir(in.state); err == nil && len(entries) > 0 {
		// Not an error by the contract (pool files + database must go; other files may stay),
		// but worth seeing.
		var names []string
		for _, e := range entries {
			names = append(names, e.Name())
		}
		note := "note: files left in the state dir after pool destroy --remove-files: " + strings.Join(names, " ")
		fmt.Fprintln(in.logFile, note)
		if in.tb != nil {
			in.tb.Log(note)
		}
	}
	if len(leftovers) > 0 {
		return fmt.Errorf("left behind after pool destroy --remove-files: %s", strings.Join(leftovers, "; "))
	}
	return os.RemoveAll(in.state)
}

func (in *instance) cleanup() error {
	var errs []string
	if in.conn != nil {
		if err := in.conn.Close(); err != nil {
			errs = append(errs, "close grpc connection: "+err.Error())
		}
	}
	if err := in.stop(); err != nil {
		errs = append(errs, err.Error())
	}
	in.unmountLeftovers()
	if err := in.destroy(); err != nil {
		errs = append(errs, err.Error())
	}
	in.logFile.Close()

	if in.tb != nil {
		if len(errs) > 0 || in.tb.Failed() {
			in.tb.Logf("thinsnap instance %s FAILED; its log (%s):\n%s", in.label, in.logPath, in.logText())
		}
	}
	if len(errs) > 0 {
		msg := strings.Join(errs, "\n")
		if in.tb == nil {
			msg += "\n" + in.logText()
		}
		return errors.New(msg)
	}
	return nil
}

// unmountLeftovers detaches whatever is still mounted in the subtest's temp dir. Some of the
// suite's checks do not unmount on their failure paths (RemoveIntermediateSnapshot t.Fatal()s with
// "base" mounted); without this, `pool destroy` would find the device busy and the leftover pool
// would be blamed on thinsnap and leak into later tests.
func (in *instance) unmountLeftovers() {
	dir := filepath.Dir(in.root)
	mounts, err := mountinfo.GetMounts(mountinfo.PrefixFilter(dir))
	if err != nil {
		return
	}
	// deepest first
	sort.Slice(mounts, func(i, j int) bool { return len(mounts[i].Mountpoint) > len(mounts[j].Mountpoint) })
	for _, m := range mounts {
		err := syscall.Unmount(m.Mountpoint, syscall.MNT_DETACH)
		note := fmt.Sprintf("note: the harness unmounted %s (%s), left mounted by the test: %v", m.Mountpoint, m.Source, err)
		fmt.Fprintln(in.logFile, note)
		if in.tb != nil {
			in.tb.Log(note)
		}
	}
}

// logText returns the daemon's log (its last 400 lines), framed, for error messages.
func (in *instance) logText() string {
	b, err := os.ReadFile(in.logPath)
	if err != nil {
		return fmt.Sprintf("(cannot read thinsnap log %s: %v)", in.logPath, err)
	}
	lines := bytes.Split(bytes.TrimRight(b, "\n"), []byte("\n"))
	const max = 400
	head := ""
	if len(lines) > max {
		head = fmt.Sprintf("[... %d earlier lines in %s]\n", len(lines)-max, in.logPath)
		lines = lines[len(lines)-max:]
	}
	return fmt.Sprintf("---- thinsnap log %s (pool %s) ----\n%s%s\n---- end of thinsnap log %s ----",
		in.label, in.pool, head, bytes.Join(lines, []byte("\n")), in.label)
}

// tbFromContext digs the subtest's testing.TB out of the logger the suite puts in the context
// (log/logtest.WithT in containerd 1.6 keeps it in an unexported hook field). The suite's factory
// signature gives us no other way to learn the subtest's name or whether it failed. Returns nil
// if the layout ever changes; the harness then still works, with less precise reporting.
func tbFromContext(ctx context.Context) testing.TB {
	entry := log.G(ctx)
	if entry == nil || entry.Logger == nil {
		return nil
	}
	tbType := reflect.TypeOf((*testing.TB)(nil)).Elem()
	for _, hooks := range entry.Logger.Hooks {
		for _, h := range hooks {
			v := reflect.ValueOf(h)
			if v.Kind() != reflect.Ptr || v.Elem().Kind() != reflect.Struct {
				continue
			}
			f := v.Elem().FieldByName("t")
			if !f.IsValid() || f.Type() != tbType || !f.CanAddr() {
				continue
			}
			if tb := *(*testing.TB)(unsafe.Pointer(f.UnsafeAddr())); tb != nil {
				return tb
			}
		}
	}
	return nil
}

func getLogDir() string {
	logDirOnce.Do(func() {
		logDir = os.Getenv("CONFORMANCE_LOGDIR")
		if logDir == "" {
			d, err := os.MkdirTemp("", "thinsnap-conformance-logs-")
			if err != nil {
				panic(err)
			}
			logDir = d
		}
		if err := os.MkdirAll(logDir, 0o755); err != nil {
			panic(err)
		}
	})
	return logDir
}

var unsafeChars = regexp.MustCompile(`[^A-Za-z0-9._-]+`)

func sanitize(s string) string { return unsafeChars.ReplaceAllString(s, "_") }

func envDuration(name string, def time.Duration) time.Duration {
	if v := os.Getenv(name); v != "" {
		if d, err := time.ParseDuration(v); err == nil {
			return d
		}
	}
	return def
}
