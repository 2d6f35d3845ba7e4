// Command driver is the benchmark driver of benches/README.md. It runs inside the VM (started by
// benches/run.sh through benches/guest.sh) except for -mode report, which runs on the host.
//
//	driver -mode devmapper -pool NAME -root DIR -base-size 128MiB -out devmapper.json
//	driver -mode thinsnap  -bin thinsnap -config FILE -sock SOCK [-metrics URL] -out thinsnap.json
//	driver -mode startup   -bin thinsnap -config FILE -sock SOCK -pool NAME -out startup.json
//	driver -mode cstart    -target thinsnap|devmapper ... [-spares N -metrics URL] -out cstart.json
//	driver -mode report    -dir RESULTS_DIR -out benches/RESULTS.md
//
// Built in GOPATH mode against Debian's containerd 1.6 source (benches/run.sh does it).
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"sync"
	"time"

	"github.com/containerd/containerd/snapshots"
	"github.com/containerd/containerd/snapshots/devmapper"
	"github.com/sirupsen/logrus"
	"google.golang.org/grpc"
)

var (
	mode       = flag.String("mode", "", "devmapper, thinsnap, startup, cstart or report")
	out        = flag.String("out", "", "JSON result file (report: the markdown file)")
	pool       = flag.String("pool", "", "thin pool name")
	root       = flag.String("root", "", "devmapper: root_path")
	baseSize   = flag.String("base-size", "128MiB", "devmapper: base_image_size")
	bin        = flag.String("bin", "", "thinsnap binary")
	config     = flag.String("config", "", "thinsnap config file")
	sock       = flag.String("sock", "", "thinsnap socket")
	logPath    = flag.String("log", "/tmp/thinsnap-bench.log", "thinsnap log file")
	ops        = flag.Int("ops", 500, "(b) operations per call and case")
	batch      = flag.Int("batch", 25, "(b) snapshots made before they are removed again")
	chain      = flag.Int("chain", 16, "(b, c) depth of the parent chain")
	clients    = flag.Int("clients", 8, "(c) concurrent clients")
	perClient  = flag.Int("conc-ops", 64, "(c) operations per client")
	iters      = flag.Int("bench-iters", 3, "(a) iterations of the 16-layer loop")
	nSnaps     = flag.Int("snapshots", 10000, "(d) snapshots in the store")
	nActive    = flag.Int("active", 1000, "(d) of which active (with a device)")
	restarts   = flag.Int("restarts", 3, "(d) warm restarts timed")
	dir        = flag.String("dir", "", "report: the results directory")
	command    = flag.String("command", "benches/run.sh", "report: the command that produced the results")
	skipLatNoP = flag.Bool("skip-noparent", false, "(b) skip the no-parent case (smoke runs)")
	metricsURL = flag.String("metrics", "", "thinsnap: its /metrics URL, to count store flushes per call in (b)")
)

func writeJSON(path string, v interface{}) {
	b, err := json.MarshalIndent(v, "", "  ")
	must(err, "encode results")
	must(os.WriteFile(path, b, 0644), "write %s", path)
	logf("wrote %s", path)
}

// workloads runs (a), (b) and (c) on one snapshotter; `clientsFor` gives the (c) clients.
func workloads(ctx context.Context, sn snapshots.Snapshotter, tag string,
	clientsFor func(n int) []snapshots.Snapshotter, during func(string) func() map[string]int64) map[string]interface{} {
	res := map[string]interface{}{}
	t0 := time.Now()

	logf("(a) benchsuite: %d iterations of %d layers", *iters, layerCount)
	res["benchsuite"] = benchsuite(ctx, sn, tag+"-bs", *iters)
	// Partial results after every part: a VM timeout keeps what was measured.
	writeJSON(*out+".partial", res)

	lat := map[string]interface{}{}
	if !*skipLatNoP {
		logf("(b) latency, no parent: %d of each", *ops)
		lat["no_parent"] = latency(ctx, sn, tag+"-np", "", *ops, *batch)
		res["latency"] = lat
		writeJSON(*out+".partial", res)
	}
	logf("(b) latency, with a parent chain of %d: %d of each", *chain, *ops)
	top, chainNames := buildChain(ctx, sn, tag+"-lat", *chain)
	lat["with_parent"] = latency(ctx, sn, tag+"-wp", top, *ops, *batch)
	lat["chain_depth"] = *chain
	res["latency"] = lat
	writeJSON(*out+".partial", res)

	logf("(c) %d concurrent clients x %d prepares then removes, parent %s", *clients, *perClient, top)
	cs := clientsFor(*clients)
	done := during("concurrent")
	c := concurrent(ctx, cs, tag+"-conc", top, *perClient)
	res["concurrent"] = c
	if m := done(); m != nil {
		res["memory_concurrent"] = m
	}
	removeAll(ctx, sn, chainNames)
	res["wall_s"] = time.Since(t0).Seconds()
	return res
}

func runDevmapper() {
	ctx := context.Background()
	logrus.SetLevel(logrus.WarnLevel)
	cfg := &devmapper.Config{RootPath: *root, PoolName: *pool, BaseImageSize: *baseSize}
	sn, err := devmapper.NewSnapshotter(ctx, cfg)
	must(err, "devmapper.NewSnapshotter")
	res := workloads(ctx, sn, "dm",
		func(n int) []snapshots.Snapshotter {
			// One snapshotter instance, as in containerd: every client goes through it.
			s := make([]snapshots.Snapshotter, n)
			for i := range s {
				s[i] = sn
			}
			return s
		},
		func(string) func() map[string]int64 { return func() map[string]int64 { return nil } })
	res["snapshotter"] = "devmapper"
	res["config"] = map[string]interface{}{"pool_name": *pool, "root_path": *root,
		"base_image_size": *baseSize, "fs_type": "ext4"}
	must(sn.Close(), "devmapper close")
	writeJSON(*out, res)
}

// settleRSS is the resident size of an idle daemon: 5 s without calls.
func settleRSS(pid int) int64 {
	time.Sleep(5 * time.Second)
	rss, _ := memKB(pid)
	return rss
}

func runThinsnap() {
	ctx := context.Background()
	d := &daemon{bin: *bin, config: *config, sock: *sock, logPath: *logPath}
	firstStart := d.start()
	if *metricsURL != "" {
		url := *metricsURL
		flushCount = func() int64 { return scrapeFlushes(url) }
	}
	logf("thinsnap ready after %s (new pool: loop files, pool, base mkfs)", firstStart)
	idle := settleRSS(d.pid())
	idleMem := memDetail(d.pid())
	sn, conn := dial(*sock)
	var conns []*grpc.ClientConn
	res := workloads(ctx, sn, "ts",
		func(n int) []snapshots.Snapshotter {
			s := make([]snapshots.Snapshotter, n)
			for i := range s {
				var c *grpc.ClientConn
				s[i], c = dial(*sock)
				conns = append(conns, c)
			}
			return s
		},
		func(string) func() map[string]int64 {
			smp := startSampler(d.pid())
			return func() map[string]int64 {
				max, mean := smp.stop()
				_, hwm := memKB(d.pid())
				return map[string]int64{"rss_max_kb": max, "rss_mean_kb": mean, "hwm_kb": hwm}
			}
		})
	for _, c := range conns {
		c.Close()
	}
	conn.Close()
	idleAfter := settleRSS(d.pid())
	res["memory_detail"] = map[string]map[string]int64{"idle_fresh": idleMem, "idle_after": memDetail(d.pid())}
	// Where the resident memory is, mapping by mapping (heap, thread arenas, stacks, the binary).
	if smaps, err := os.ReadFile(fmt.Sprintf("/proc/%d/smaps", d.pid())); err == nil {
		os.WriteFile(strings.TrimSuffix(*out, ".json")+"-smaps-idle-after.txt", smaps, 0644)
	}
	res["snapshotter"] = "thinsnap"
	res["first_start_s"] = firstStart.Seconds()
	res["memory_idle"] = map[string]int64{"rss_fresh_kb": idle, "rss_after_kb": idleAfter}
	cfgText, _ := os.ReadFile(*config)
	res["config_toml"] = string(cfgText)
	d.stop()
	writeJSON(*out, res)
}

func activeDevices(pool string) int {
	ents, err := os.ReadDir("/dev/mapper")
	must(err, "read /dev/mapper")
	n := 0
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), pool+"-snap-") {
			n++
		}
	}
	return n
}

// firstCall times a fresh connection and one Stat, as a client's first call after a start.
func firstCall(ctx context.Context, key string) time.Duration {
	t := time.Now()
	sn, conn := dial(*sock)
	_, err := sn.Stat(ctx, key)
	must(err, "stat %s", key)
	d := time.Since(t)
	conn.Close()
	return d
}

// served measures, from the daemon's exec, when it answers reads (a Stat, which a settled
// store answers while the pool is still being made) and when it answers every call (an Update
// of a label: a store write, which waits for recovery), each with a new connection.
func served(ctx context.Context, d *daemon, key string) (reads, all time.Duration) {
	sn, conn := dial(*sock)
	defer conn.Close()
	_, err := sn.Stat(ctx, key)
	must(err, "stat %s", key)
	reads = time.Since(d.t0)
	_, err = sn.Update(ctx, snapshots.Info{Name: key, Labels: map[string]string{"bench": "1"}}, "labels.bench")
	must(err, "update %s", key)
	return reads, time.Since(d.t0)
}

func runStartup() {
	ctx := context.Background()
	d := &daemon{bin: *bin, config: *config, sock: *sock, logPath: *logPath}
	firstStart := d.start()
	if *metricsURL != "" {
		url := *metricsURL
		flushCount = func() int64 { return scrapeFlushes(url) }
	}
	logf("thinsnap ready after %s (new pool)", firstStart)
	idleEmpty := settleRSS(d.pid())
	memEmpty := memDetail(d.pid())

	// Populate: nActive chains of committed layers, an active snapshot on top of each.
	committed := *nSnaps - *nActive
	logf("(d) populating %d committed + %d active snapshots with %d clients", committed, *nActive, *fillClients)
	var sns []snapshots.Snapshotter
	var conns []*grpc.ClientConn
	for i := 0; i < *fillClients; i++ {
		s, c := dial(*sock)
		sns, conns = append(sns, s), append(conns, c)
	}
	work := make(chan int, *nActive)
	for j := 0; j < *nActive; j++ {
		work <- j
	}
	close(work)
	var wg sync.WaitGroup
	var mu sync.Mutex
	made := 0
	t0 := time.Now()
	for _, sn := range sns {
		wg.Add(1)
		go func(sn snapshots.Snapshotter) {
			defer wg.Done()
			for j := range work {
				depth := committed / *nActive
				if j < committed%*nActive {
					depth++
				}
				parent := ""
				for k := 0; k < depth; k++ {
					key := "st-tmp-" + itoa(j) + "-" + itoa(k)
					_, err := sn.Prepare(ctx, key, parent)
					must(err, "populate prepare %s", key)
					name := "st-layer-" + itoa(j) + "-" + itoa(k)
					must(sn.Commit(ctx, name, key), "populate commit %s", key)
					parent = name
				}
				key := "st-active-" + itoa(j)
				_, err := sn.Prepare(ctx, key, parent)
				must(err, "populate active %s", key)
				mu.Lock()
				made++
				if made%100 == 0 {
					logf("(d) %d/%d chains (%.0fs)", made, *nActive, time.Since(t0).Seconds())
				}
				mu.Unlock()
			}
		}(sn)
	}
	wg.Wait()
	populate := time.Since(t0)
	for _, c := range conns {
		c.Close()
	}
	sn, conn := dial(*sock)
	t := time.Now()
	count := 0
	must(sn.Walk(ctx, func(context.Context, snapshots.Info) error { count++; return nil }), "walk")
	walk := time.Since(t)
	conn.Close()
	active := activeDevices(*pool)
	logf("(d) populated in %s: %d snapshots listed in %s, %d active devices", populate, count, walk, active)
	idleFull := settleRSS(d.pid())
	memFull := memDetail(d.pid())

	res := map[string]interface{}{
		"fill_clients": *fillClients, "memory_detail": map[string]map[string]int64{"idle_empty": memEmpty, "idle_filled": memFull},
		"snapshots": count, "active_devices": active, "populate_s": populate.Seconds(),
		"list_all_s": walk.Seconds(), "first_start_s": firstStart.Seconds(),
		"rss_idle_empty_kb": idleEmpty, "rss_idle_populated_kb": idleFull,
	}
	var warm, warmFirst, warmReads, warmAll, stops []float64
	var warmRSS []int64
	for i := 0; i < *restarts; i++ {
		stops = append(stops, d.stop().Seconds())
		r := d.start()
		fc := firstCall(ctx, "st-active-0")
		reads, all := served(ctx, d, "st-active-0")
		warm, warmFirst = append(warm, r.Seconds()), append(warmFirst, fc.Seconds())
		warmReads, warmAll = append(warmReads, reads.Seconds()), append(warmAll, all.Seconds())
		warmRSS = append(warmRSS, settleRSS(d.pid()))
		logf("(d) warm restart %d: socket after %s, first call %s; from exec: reads %s, every call %s", i+1, r, fc, reads, all)
	}
	res["warm_ready_s"], res["warm_first_call_s"], res["stop_s"], res["warm_rss_kb"] = warm, warmFirst, stops, warmRSS
	res["warm_reads_s"], res["warm_all_s"] = warmReads, warmAll
	res["warm_active_devices"] = activeDevices(*pool)

	// Cold: as after a reboot, no dm device, no loop device; the pool files and database stay.
	d.stop()
	tool := exec.Command(*bin, "pool", "destroy", "--config", *config)
	outp, err := tool.CombinedOutput()
	must(err, "thinsnap pool destroy: %s", outp)
	before := activeDevices(*pool)
	r := d.start()
	fc := firstCall(ctx, "st-active-0")
	reads, all := served(ctx, d, "st-active-0")
	after := activeDevices(*pool)
	logf("(d) cold start: socket after %s, first call %s; from exec: reads %s, every call %s; devices %d -> %d", r, fc, reads, all, before, after)
	res["cold_ready_s"], res["cold_first_call_s"] = r.Seconds(), fc.Seconds()
	res["cold_reads_s"], res["cold_all_s"] = reads.Seconds(), all.Seconds()
	res["cold_devices_before"], res["cold_devices_after"] = before, after
	// The first Mounts of snapshots with no device (lazy activation), each on its own snapshot,
	// then a second Mounts of the same one (its device now active).
	n := *firstMounts
	if n > *nActive-1 {
		n = *nActive - 1
	}
	msn, mconn := dial(*sock)
	var first, second []time.Duration
	for j := 1; j <= n; j++ {
		key := "st-active-" + itoa(j)
		t := time.Now()
		_, err := msn.Mounts(ctx, key)
		first = append(first, time.Since(t))
		must(err, "first mounts %s", key)
		t = time.Now()
		_, err = msn.Mounts(ctx, key)
		second = append(second, time.Since(t))
		must(err, "second mounts %s", key)
	}
	mconn.Close()
	res["cold_first_mounts"], res["cold_second_mounts"] = summarize(first), summarize(second)
	res["cold_devices_after_mounts"] = activeDevices(*pool)
	logf("(d) after the reboot: first Mounts of %d inactive snapshots p50 %s; devices now %d", n, time.Duration(summarize(first).P50), activeDevices(*pool))
	res["cold_rss_kb"] = settleRSS(d.pid())
	res["memory_detail"].(map[string]map[string]int64)["cold_idle"] = memDetail(d.pid())
	d.stop()
	writeJSON(*out, res)
}

func itoa(i int) string {
	b, _ := json.Marshal(i)
	return string(b)
}

func main() {
	flag.Parse()
	switch *mode {
	case "devmapper":
		runDevmapper()
	case "thinsnap":
		runThinsnap()
	case "startup":
		runStartup()
	case "cstart":
		runCstart()
	case "report":
		runReport()
	default:
		flag.Usage()
		os.Exit(2)
	}
}
