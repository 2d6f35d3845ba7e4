package main

// The workloads (a), (b) and (c) of benches/README.md, written once against containerd's
// snapshots.Snapshotter interface and run unchanged on both snapshotters: containerd's devmapper
// snapshotter in process, and thinsnap through containerd's own proxy client over its socket.

import (
	"bufio"
	"context"
	"crypto/rand"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/containerd/containerd/mount"
	"github.com/containerd/containerd/snapshots"
	"github.com/containerd/continuity/fs/fstest"
)

// Stats of one series of latencies, in nanoseconds.
type Stats struct {
	N    int   `json:"n"`
	P50  int64 `json:"p50_ns"`
	P99  int64 `json:"p99_ns"`
	Mean int64 `json:"mean_ns"`
	Min  int64 `json:"min_ns"`
	Max  int64 `json:"max_ns"`
	// Durable store writes (sled flushes: an fsync each on a disk) per call, counted by
	// thinsnap's thinsnap_store_flushes_total; absent for devmapper.
	FsyncsPerCall *float64 `json:"fsyncs_per_call,omitempty"`
}

func summarize(d []time.Duration) Stats {
	if len(d) == 0 {
		return Stats{}
	}
	v := append([]time.Duration(nil), d...)
	sort.Slice(v, func(i, j int) bool { return v[i] < v[j] })
	pct := func(p float64) int64 {
		i := int(p/100*float64(len(v)) + 0.999999)
		if i < 1 {
			i = 1
		}
		if i > len(v) {
			i = len(v)
		}
		return int64(v[i-1])
	}
	var sum time.Duration
	for _, x := range v {
		sum += x
	}
	return Stats{N: len(v), P50: pct(50), P99: pct(99), Mean: int64(sum) / int64(len(v)),
		Min: int64(v[0]), Max: int64(v[len(v)-1])}
}

func must(err error, what string, args ...interface{}) {
	if err != nil {
		fmt.Fprintf(os.Stderr, "driver: %s: %v\n", fmt.Sprintf(what, args...), err)
		os.Exit(1)
	}
}

func logf(format string, args ...interface{}) {
	fmt.Fprintf(os.Stderr, "[%s] %s\n", time.Now().Format("15:04:05"), fmt.Sprintf(format, args...))
}

// ---- (a) containerd's benchsuite loop -----------------------------------------------------------
// benchmarkSnapshotter, makeApplier and updateFile below are containerd 1.6.20's
// snapshots/benchsuite/benchmark_test.go (Apache-2.0, The containerd Authors), unchanged but for
// the testing.B plumbing: 16 layers, each Prepare -> mount and write 1 MiB files -> Commit.

const (
	layerCount    = 16
	fileSizeBytes = int64(1 * 1024 * 1024)
)

// BenchsuiteResult holds the per-iteration step totals of the benchsuite loop.
type BenchsuiteResult struct {
	Iterations   int       `json:"iterations"`
	Layers       int       `json:"layers"`
	BytesPerIter int64     `json:"bytes_per_iteration"`
	TotalS       []float64 `json:"total_s"`
	PrepareS     []float64 `json:"prepare_s"`
	WriteS       []float64 `json:"write_s"`
	CommitS      []float64 `json:"commit_s"`
	Prepare      Stats     `json:"prepare"`
	PrepareFirst Stats     `json:"prepare_first_layer"`
	Write        Stats     `json:"write"`
	Commit       Stats     `json:"commit"`
}

func benchsuite(ctx context.Context, sn snapshots.Snapshotter, tag string, iters int) BenchsuiteResult {
	layers := make([]fstest.Applier, 0, layerCount)
	total := 0
	for i := 1; i <= layerCount; i++ {
		appliers := makeApplier(i, fileSizeBytes)
		layers = append(layers, fstest.Apply(appliers...))
		total += len(appliers)
	}
	res := BenchsuiteResult{Iterations: iters, Layers: layerCount, BytesPerIter: int64(total) * fileSizeBytes}
	var prep, prepFirst, write, commit []time.Duration
	idx := 0
	for it := 0; it < iters; it++ {
		parent := ""
		var committed []string
		var tp, tw, tc time.Duration
		start := time.Now()
		for l := 0; l < layerCount; l++ {
			idx++
			current := fmt.Sprintf("%s-prepare-layer-%d", tag, idx)
			t := time.Now()
			mounts, err := sn.Prepare(ctx, current, parent)
			must(err, "benchsuite prepare %s", current)
			d := time.Since(t)
			tp += d
			prep = append(prep, d)
			if l == 0 {
				prepFirst = append(prepFirst, d)
			}

			t = time.Now()
			must(mount.WithTempMount(ctx, mounts, layers[l].Apply), "benchsuite write %s", current)
			d = time.Since(t)
			tw += d
			write = append(write, d)

			idx++
			parent = fmt.Sprintf("%s-committed-%d", tag, idx)
			t = time.Now()
			must(sn.Commit(ctx, parent, current), "benchsuite commit %s", current)
			d = time.Since(t)
			tc += d
			commit = append(commit, d)
			committed = append(committed, parent)
		}
		wall := time.Since(start)
		res.TotalS = append(res.TotalS, wall.Seconds())
		res.PrepareS = append(res.PrepareS, tp.Seconds())
		res.WriteS = append(res.WriteS, tw.Seconds())
		res.CommitS = append(res.CommitS, tc.Seconds())
		logf("benchsuite %s iteration %d: total %.2fs (prepare %.2fs, write %.2fs, commit %.2fs)",
			tag, it+1, wall.Seconds(), tp.Seconds(), tw.Seconds(), tc.Seconds())
		// Not timed: free the pool for the next iteration.
		for i := len(committed) - 1; i >= 0; i-- {
			must(sn.Remove(ctx, committed[i]), "benchsuite cleanup %s", committed[i])
		}
	}
	res.Prepare, res.PrepareFirst = summarize(prep), summarize(prepFirst)
	res.Write, res.Commit = summarize(write), summarize(commit)
	return res
}

func makeApplier(layerIndex int, fileSizeBytes int64) []fstest.Applier {
	seed := time.Now().UnixNano()

	switch {
	case layerIndex%3 == 0:
		return []fstest.Applier{
			updateFile("/a"),
			updateFile("/b"),
			fstest.CreateRandomFile("/c", seed, fileSizeBytes, 0777),
			updateFile("/d"),
			fstest.CreateRandomFile("/f", seed, fileSizeBytes, 0777),
			updateFile("/e"),
			fstest.RemoveAll("/g"),
			fstest.CreateRandomFile("/h", seed, fileSizeBytes, 0777),
			updateFile("/i"),
			fstest.CreateRandomFile("/j", seed, fileSizeBytes, 0777),
		}
	case layerIndex%2 == 0:
		return []fstest.Applier{
			updateFile("/a"),
			fstest.CreateRandomFile("/b", seed, fileSizeBytes, 0777),
			fstest.RemoveAll("/c"),
			fstest.CreateRandomFile("/d", seed, fileSizeBytes, 0777),
			updateFile("/e"),
			fstest.RemoveAll("/f"),
			fstest.CreateRandomFile("/g", seed, fileSizeBytes, 0777),
			updateFile("/h"),
			fstest.CreateRandomFile("/i", seed, fileSizeBytes, 0777),
			updateFile("/j"),
		}
	default:
		return []fstest.Applier{
			fstest.CreateRandomFile("/a", seed, fileSizeBytes, 0777),
			fstest.CreateRandomFile("/b", seed, fileSizeBytes, 0777),
			fstest.CreateRandomFile("/c", seed, fileSizeBytes, 0777),
			fstest.CreateRandomFile("/d", seed, fileSizeBytes, 0777),
			fstest.CreateRandomFile("/e", seed, fileSizeBytes, 0777),
			fstest.CreateRandomFile("/f", seed, fileSizeBytes, 0777),
			fstest.CreateRandomFile("/g", seed, fileSizeBytes, 0777),
			fstest.CreateRandomFile("/h", seed, fileSizeBytes, 0777),
			fstest.CreateRandomFile("/i", seed, fileSizeBytes, 0777),
			fstest.CreateRandomFile("/j", seed, fileSizeBytes, 0777),
		}
	}
}

type applierFn func(root string) error

func (fn applierFn) Apply(root string) error {
	return fn(root)
}

func updateFile(name string) applierFn {
	return func(root string) error {
		path := filepath.Join(root, name)
		file, err := os.OpenFile(path, os.O_WRONLY, 0600)
		if err != nil {
			return fmt.Errorf("failed to open %q: %w", path, err)
		}

		info, err := file.Stat()
		if err != nil {
			return err
		}

		var (
			offset = info.Size() / 2
			buf    = make([]byte, 4)
		)

		if _, err := rand.Read(buf); err != nil {
			return err
		}

		if _, err := file.WriteAt(buf, offset); err != nil {
			return fmt.Errorf("failed to write %q at offset %d: %w", path, offset, err)
		}

		return file.Close()
	}
}

// ---- (b) latency of each call --------------------------------------------------------------------

// buildChain commits `depth` empty layers on top of each other and returns the top's name.
func buildChain(ctx context.Context, sn snapshots.Snapshotter, tag string, depth int) (string, []string) {
	parent := ""
	var names []string
	for i := 0; i < depth; i++ {
		key := fmt.Sprintf("%s-chain-active-%d", tag, i)
		_, err := sn.Prepare(ctx, key, parent)
		must(err, "chain prepare %s", key)
		name := fmt.Sprintf("%s-chain-%d", tag, i)
		must(sn.Commit(ctx, name, key), "chain commit %s", key)
		names = append(names, name)
		parent = name
	}
	return parent, names
}

func removeAll(ctx context.Context, sn snapshots.Snapshotter, names []string) {
	for i := len(names) - 1; i >= 0; i-- {
		must(sn.Remove(ctx, names[i]), "remove %s", names[i])
	}
}

// latency times each call of n Prepares, Commits, Views and Removes on `parent` ("" for none),
// in batches of `batch` so that the pool never holds more than 2*batch of them at once.
func latency(ctx context.Context, sn snapshots.Snapshotter, tag, parent string, n, batch int) map[string]Stats {
	var prep, view, commit, rmActive, rmCommitted, stat []time.Duration
	// Store flushes per kind of call: the counter is read before and after each run of one kind
	// (the calls are sequential, nothing else runs), outside the timed calls.
	flushes := map[string]int64{}
	calls := map[string]int{}
	counted := func(op string, k int, f func()) {
		if flushCount == nil {
			f()
			return
		}
		before := flushCount()
		f()
		flushes[op] += flushCount() - before
		calls[op] += k
	}
	timed := func(into *[]time.Duration, what string, f func() error) {
		t := time.Now()
		err := f()
		d := time.Since(t)
		must(err, "%s", what)
		*into = append(*into, d)
	}
	for start := 0; start < n; start += batch {
		end := start + batch
		if end > n {
			end = n
		}
		counted("prepare", end-start, func() {
			for i := start; i < end; i++ {
				key := fmt.Sprintf("%s-p-%d", tag, i)
				timed(&prep, "prepare "+key, func() error { _, err := sn.Prepare(ctx, key, parent); return err })
			}
		})
		// Stat: a read-only call, the cost of the RPC path and a store read without the kernel.
		counted("stat", end-start, func() {
			for i := start; i < end; i++ {
				key := fmt.Sprintf("%s-p-%d", tag, i)
				timed(&stat, "stat "+key, func() error { _, err := sn.Stat(ctx, key); return err })
			}
		})
		counted("commit", end-start, func() {
			for i := start; i < end; i++ {
				key, name := fmt.Sprintf("%s-p-%d", tag, i), fmt.Sprintf("%s-c-%d", tag, i)
				timed(&commit, "commit "+key, func() error { return sn.Commit(ctx, name, key) })
			}
		})
		counted("view", end-start, func() {
			for i := start; i < end; i++ {
				key := fmt.Sprintf("%s-v-%d", tag, i)
				timed(&view, "view "+key, func() error { _, err := sn.View(ctx, key, parent); return err })
			}
		})
		counted("remove_active", end-start, func() {
			for i := start; i < end; i++ {
				key := fmt.Sprintf("%s-v-%d", tag, i)
				timed(&rmActive, "remove "+key, func() error { return sn.Remove(ctx, key) })
			}
		})
		counted("remove_committed", end-start, func() {
			for i := start; i < end; i++ {
				name := fmt.Sprintf("%s-c-%d", tag, i)
				timed(&rmCommitted, "remove "+name, func() error { return sn.Remove(ctx, name) })
			}
		})
		if end%100 == 0 || end == n {
			logf("latency %s: %d/%d", tag, end, n)
		}
	}
	res := map[string]Stats{
		"prepare":          summarize(prep),
		"view":             summarize(view),
		"commit":           summarize(commit),
		"remove_active":    summarize(rmActive),
		"remove_committed": summarize(rmCommitted),
		"stat":             summarize(stat),
	}
	for op, k := range calls {
		if k > 0 {
			st := res[op]
			v := float64(flushes[op]) / float64(k)
			st.FsyncsPerCall = &v
			res[op] = st
		}
	}
	return res
}

// flushCount reads thinsnap_store_flushes_total from thinsnap's metrics endpoint (-metrics);
// nil when there is none (devmapper, or thinsnap without -metrics).
var flushCount func() int64

func scrapeFlushes(url string) int64 {
	resp, err := http.Get(url)
	must(err, "GET %s", url)
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) == 2 && f[0] == "thinsnap_store_flushes_total" {
			v, err := strconv.ParseFloat(f[1], 64)
			must(err, "parse %q", sc.Text())
			return int64(v)
		}
	}
	must(fmt.Errorf("no thinsnap_store_flushes_total"), "scrape %s", url)
	return 0
}

// ---- (c) concurrent clients ----------------------------------------------------------------------

// ConcResult is the throughput of concurrent Prepares, then Removes of what they made.
type ConcResult struct {
	Clients        int     `json:"clients"`
	OpsPerClient   int     `json:"ops_per_client"`
	Parent         string  `json:"parent"`
	PrepareWallS   float64 `json:"prepare_wall_s"`
	PreparePerS    float64 `json:"prepare_ops_per_s"`
	RemoveWallS    float64 `json:"remove_wall_s"`
	RemovePerS     float64 `json:"remove_ops_per_s"`
	PrepareLatency Stats   `json:"prepare_latency"`
	RemoveLatency  Stats   `json:"remove_latency"`
}

func concurrent(ctx context.Context, clients []snapshots.Snapshotter, tag, parent string, perClient int) ConcResult {
	res := ConcResult{Clients: len(clients), OpsPerClient: perClient, Parent: parent}
	run := func(op string, f func(sn snapshots.Snapshotter, key string) error) (time.Duration, []time.Duration) {
		var mu sync.Mutex
		var lat []time.Duration
		var wg sync.WaitGroup
		start := time.Now()
		for c, sn := range clients {
			wg.Add(1)
			go func(c int, sn snapshots.Snapshotter) {
				defer wg.Done()
				local := make([]time.Duration, 0, perClient)
				for i := 0; i < perClient; i++ {
					key := fmt.Sprintf("%s-%d-%d", tag, c, i)
					t := time.Now()
					must(f(sn, key), "concurrent %s %s", op, key)
					local = append(local, time.Since(t))
				}
				mu.Lock()
				lat = append(lat, local...)
				mu.Unlock()
			}(c, sn)
		}
		wg.Wait()
		return time.Since(start), lat
	}
	total := float64(len(clients) * perClient)
	wall, lat := run("prepare", func(sn snapshots.Snapshotter, key string) error {
		_, err := sn.Prepare(ctx, key, parent)
		return err
	})
	res.PrepareWallS, res.PreparePerS, res.PrepareLatency = wall.Seconds(), total/wall.Seconds(), summarize(lat)
	logf("concurrent %s: %d prepares in %.2fs", tag, int(total), wall.Seconds())
	wall, lat = run("remove", func(sn snapshots.Snapshotter, key string) error { return sn.Remove(ctx, key) })
	res.RemoveWallS, res.RemovePerS, res.RemoveLatency = wall.Seconds(), total/wall.Seconds(), summarize(lat)
	logf("concurrent %s: %d removes in %.2fs", tag, int(total), wall.Seconds())
	return res
}
