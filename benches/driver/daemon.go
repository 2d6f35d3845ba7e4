package main

// Starting, stopping and watching a thinsnap daemon, and connecting to it exactly as containerd
// 1.6 connects to a proxy snapshotter plugin.

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/defaults"
	"github.com/containerd/containerd/pkg/dialer"
	"github.com/containerd/containerd/snapshots"
	"github.com/containerd/containerd/snapshots/proxy"
	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
)

type daemon struct {
	bin, config, sock, logPath string
	cmd                        *exec.Cmd
	logFile                    *os.File
	exited                     chan error
	t0                         time.Time // when the last start was exec'd
}

// start spawns `thinsnap serve` and returns how long it took until the socket accepted a
// connection (the readiness the README defines).
func (d *daemon) start() time.Duration {
	f, err := os.OpenFile(d.logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0644)
	must(err, "open log %s", d.logPath)
	d.logFile = f
	d.cmd = exec.Command(d.bin, "serve", "--config", d.config)
	d.cmd.Stdout, d.cmd.Stderr = f, f
	t0 := time.Now()
	d.t0 = t0
	must(d.cmd.Start(), "start %s", d.bin)
	d.exited = make(chan error, 1)
	go func() { d.exited <- d.cmd.Wait() }()
	for {
		c, err := net.Dial("unix", d.sock)
		if err == nil {
			c.Close()
			return time.Since(t0)
		}
		select {
		case err := <-d.exited:
			must(fmt.Errorf("exited: %v", err), "thinsnap start (log %s)", d.logPath)
		default:
		}
		if time.Since(t0) > 10*time.Minute {
			must(fmt.Errorf("no socket after 10 minutes"), "thinsnap start (log %s)", d.logPath)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

// stop sends SIGTERM and waits for the daemon to exit; returns how long that took.
func (d *daemon) stop() time.Duration {
	t0 := time.Now()
	must(syscall.Kill(d.cmd.Process.Pid, syscall.SIGTERM), "SIGTERM thinsnap")
	select {
	case err := <-d.exited:
		must(err, "thinsnap exit status (log %s)", d.logPath)
	case <-time.After(5 * time.Minute):
		must(fmt.Errorf("still running 5 minutes after SIGTERM"), "thinsnap stop")
	}
	d.logFile.Close()
	return time.Since(t0)
}

func (d *daemon) pid() int { return d.cmd.Process.Pid }

// memKB returns VmRSS and VmHWM of pid in KiB.
func memKB(pid int) (rss, hwm int64) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, 0
	}
	defer f.Close()
	s := bufio.NewScanner(f)
	for s.Scan() {
		fields := strings.Fields(s.Text())
		if len(fields) < 2 {
			continue
		}
		v, _ := strconv.ParseInt(fields[1], 10, 64)
		switch fields[0] {
		case "VmRSS:":
			rss = v
		case "VmHWM:":
			hwm = v
		}
	}
	return rss, hwm
}

// sampler records VmRSS of pid every 20ms until stopped.
type sampler struct {
	stopCh chan struct{}
	wg     sync.WaitGroup
	max    int64
	sum    int64
	n      int64
}

func startSampler(pid int) *sampler {
	s := &sampler{stopCh: make(chan struct{})}
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		t := time.NewTicker(20 * time.Millisecond)
		defer t.Stop()
		for {
			rss, _ := memKB(pid)
			if rss > s.max {
				s.max = rss
			}
			s.sum += rss
			s.n++
			select {
			case <-s.stopCh:
				return
			case <-t.C:
			}
		}
	}()
	return s
}

func (s *sampler) stop() (maxKB, meanKB int64) {
	close(s.stopCh)
	s.wg.Wait()
	if s.n == 0 {
		return 0, 0
	}
	return s.max, s.sum / s.n
}

// dial connects to a proxy snapshotter with containerd 1.6's own dial options
// (services/server/server.go) and wraps it in containerd's proxy Snapshotter.
func dial(sock string) (snapshots.Snapshotter, *grpc.ClientConn) {
	bc := backoff.DefaultConfig
	bc.MaxDelay = 3 * time.Second
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	conn, err := grpc.DialContext(ctx, dialer.DialAddress(sock),
		grpc.WithInsecure(),
		grpc.WithConnectParams(grpc.ConnectParams{Backoff: bc}),
		grpc.WithContextDialer(dialer.ContextDialer),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(defaults.DefaultMaxRecvMsgSize)),
		grpc.WithDefaultCallOptions(grpc.MaxCallSendMsgSize(defaults.DefaultMaxSendMsgSize)),
		grpc.WithBlock(),
	)
	must(err, "dial %s", sock)
	return proxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(conn), "thinsnap"), conn
}
