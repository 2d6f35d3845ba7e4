package main

// -mode report: benches/RESULTS.md from the JSON files one VM run wrote.

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"
)

type envInfo struct {
	Kernel   string `json:"kernel"`
	Uname    string `json:"uname"`
	VCPUs    int    `json:"vcpus"`
	MemMiB   int    `json:"mem_mib"`
	CPU      string `json:"cpu"`
	Dmsetup  string `json:"dmsetup"`
	Mkfs     string `json:"mkfs"`
	DataMiB  int    `json:"data_mib"`
	MetaMiB  int    `json:"metadata_mib"`
	BlockKiB int    `json:"block_kib"`
	BaseMiB  int    `json:"base_mib"`
	Started  string `json:"started"`
	Counts   string `json:"counts"`
}

type snapResult struct {
	Benchsuite BenchsuiteResult `json:"benchsuite"`
	Latency    struct {
		NoParent   map[string]Stats `json:"no_parent"`
		WithParent map[string]Stats `json:"with_parent"`
		ChainDepth int              `json:"chain_depth"`
	} `json:"latency"`
	Concurrent       ConcResult       `json:"concurrent"`
	MemoryConcurrent map[string]int64 `json:"memory_concurrent"`
	MemoryIdle       map[string]int64 `json:"memory_idle"`
	FirstStartS      float64          `json:"first_start_s"`
	WallS            float64          `json:"wall_s"`
	// VmRSS, RssAnon, RssFile, RssShmem of the idle daemon: "idle_fresh", "idle_after".
	MemoryDetail map[string]map[string]int64 `json:"memory_detail"`
}

// cstartResult is one -mode cstart run: (g) the container-start path, and (h) Prepare and View on
// the image's top layer (thinsnap only).
type cstartResult struct {
	Snapshotter   string             `json:"snapshotter"`
	Layers        int                `json:"layers"`
	Containers    int                `json:"containers"`
	Spares        int                `json:"spares"`
	Start         map[string]Stats   `json:"container_start"`
	StartSpares   map[string]float64 `json:"container_start_spares"`
	ParentLatency map[string]Stats   `json:"parent_latency"`
	ParentSpares  map[string]float64 `json:"parent_latency_spares"`
	MemoryAfter   map[string]int64   `json:"memory_after"`
	// (i) and (j); zero when the run had none.
	Burst        burstResult        `json:"burst"`
	BurstSpares  map[string]float64 `json:"burst_spares"`
	Unpack       unpackResult       `json:"unpack"`
	UnpackSpares map[string]float64 `json:"unpack_spares"`
}

// burstResult is (i): every call's latency over all bursts, and each burst's wall time.
type burstResult struct {
	N       int   `json:"n"`
	Rounds  int   `json:"rounds"`
	Prepare Stats `json:"prepare"`
	Wall    Stats `json:"wall"`
}

// unpackResult is (j): the whole unpack of an image, and each layer's steps.
type unpackResult struct {
	Layers   int   `json:"layers"`
	Rounds   int   `json:"rounds"`
	TarBytes int   `json:"tar_bytes"`
	Unpack   Stats `json:"unpack"`
	Prepare  Stats `json:"prepare"`
	Apply    Stats `json:"apply"`
	Commit   Stats `json:"commit"`
}

type startupResult struct {
	Snapshots         int       `json:"snapshots"`
	ActiveDevices     int       `json:"active_devices"`
	PopulateS         float64   `json:"populate_s"`
	ListAllS          float64   `json:"list_all_s"`
	FirstStartS       float64   `json:"first_start_s"`
	RSSIdleEmptyKB    int64     `json:"rss_idle_empty_kb"`
	RSSIdlePopulated  int64     `json:"rss_idle_populated_kb"`
	WarmReadyS        []float64 `json:"warm_ready_s"`
	WarmFirstCallS    []float64 `json:"warm_first_call_s"`
	StopS             []float64 `json:"stop_s"`
	WarmRSSKB         []int64   `json:"warm_rss_kb"`
	WarmActiveDevices int       `json:"warm_active_devices"`
	ColdReadyS        float64   `json:"cold_ready_s"`
	ColdFirstCallS    float64   `json:"cold_first_call_s"`
	// From exec: the first Stat answered (reads), the first Update answered (every call).
	ColdReadsS       float64   `json:"cold_reads_s"`
	ColdAllS         float64   `json:"cold_all_s"`
	WarmReadsS       []float64 `json:"warm_reads_s"`
	WarmAllS         []float64 `json:"warm_all_s"`
	ColdBefore       int       `json:"cold_devices_before"`
	ColdAfter        int       `json:"cold_devices_after"`
	ColdRSSKB        int64     `json:"cold_rss_kb"`
	FillClients      int       `json:"fill_clients"`
	ColdFirstMounts  Stats     `json:"cold_first_mounts"`
	ColdSecondMounts Stats     `json:"cold_second_mounts"`
	ColdAfterMounts  int       `json:"cold_devices_after_mounts"`
	// "idle_empty", "idle_filled", "cold_idle".
	MemoryDetail map[string]map[string]int64 `json:"memory_detail"`
}

type floorResult struct {
	Ops        int              `json:"ops"`
	Chain      int              `json:"chain"`
	NoParent   map[string]Stats `json:"no_parent"`
	WithParent map[string]Stats `json:"with_parent"`
	// The same series with the udev flags of a private device (absent in runs before them).
	NoParentPrivate   map[string]Stats `json:"no_parent_private"`
	WithParentPrivate map[string]Stats `json:"with_parent_private"`
	UdevRunning       bool             `json:"udev_running"`
}

// load reads NAME from the first of the comma-separated dirs that has it, or else the partial
// file a timed-out phase left (NAME.partial).
func load(dirs, name string, v interface{}) bool {
	for _, n := range []string{name, name + ".partial"} {
		for _, d := range strings.Split(dirs, ",") {
			b, err := os.ReadFile(filepath.Join(d, n))
			if err != nil {
				continue
			}
			must(json.Unmarshal(b, v), "decode %s", filepath.Join(d, n))
			loaded = append(loaded, strings.TrimPrefix(filepath.Join(d, n), repoRoot()+"/"))
			return true
		}
	}
	return false
}

var loaded []string

func ms(ns int64) string {
	if ns == 0 {
		return "–"
	}
	v := float64(ns) / 1e6
	switch {
	case v >= 100:
		return fmt.Sprintf("%.0f ms", v)
	case v >= 10:
		return fmt.Sprintf("%.1f ms", v)
	default:
		return fmt.Sprintf("%.2f ms", v)
	}
}

func ratio(a, b float64) string {
	if a == 0 || b == 0 {
		return "–"
	}
	return fmt.Sprintf("%.2fx", a/b)
}

func mib(kb int64) string { return fmt.Sprintf("%.1f MiB", float64(kb)/1024) }

func median(v []float64) float64 {
	if len(v) == 0 {
		return 0
	}
	s := append([]float64(nil), v...)
	for i := range s {
		for j := i + 1; j < len(s); j++ {
			if s[j] < s[i] {
				s[i], s[j] = s[j], s[i]
			}
		}
	}
	return s[len(s)/2]
}

func maxf(v []float64) float64 {
	m := 0.0
	for _, x := range v {
		if x > m {
			m = x
		}
	}
	return m
}

func mean(v []float64) float64 {
	if len(v) == 0 {
		return 0
	}
	s := 0.0
	for _, x := range v {
		s += x
	}
	return s / float64(len(v))
}

func yes(ok bool) string {
	if ok {
		return "**met**"
	}
	return "**missed**"
}

// storage is every result of one storage (file names with its suffix).
type storage struct {
	name, sfx                               string
	ts, dm                                  snapResult
	st                                      startupResult
	fl, flNoUdev                            floorResult
	csOff, csOn, csDM, csOV                 cstartResult
	haveTS, haveDM, haveST, haveFL          bool
	haveCSOff, haveCSOn, haveCSDM, csOnSkip bool
	haveCSOV, haveFLNoUdev                  bool
}

func loadStorage(name, sfx string) *storage {
	s := &storage{name: name, sfx: sfx}
	s.haveTS = load(*dir, "thinsnap"+sfx+".json", &s.ts)
	s.haveDM = load(*dir, "devmapper"+sfx+".json", &s.dm)
	s.haveST = load(*dir, "startup"+sfx+".json", &s.st)
	s.haveFL = load(*dir, "floor"+sfx+".json", &s.fl)
	s.haveFLNoUdev = load(*dir, "floor-noudev"+sfx+".json", &s.flNoUdev)
	s.haveCSOff = loadFinal(*dir, "cstart-ts"+sfx+".json", &s.csOff)
	s.haveCSOn = loadFinal(*dir, "cstart-ts-spares"+sfx+".json", &s.csOn)
	s.haveCSDM = loadFinal(*dir, "cstart-dm"+sfx+".json", &s.csDM)
	s.haveCSOV = loadFinal(*dir, "cstart-ov"+sfx+".json", &s.csOV)
	return s
}

func (s *storage) any() bool {
	return s.haveTS || s.haveDM || s.haveST || s.haveFL || s.haveCSOff || s.haveCSOn || s.haveCSDM || s.haveCSOV
}

// loadFinal is load without the .partial fallback: a spares-on run that failed its check leaves
// only .partial/.failed files, which must never be reported as figures.
func loadFinal(dirs, name string, v interface{}) bool {
	for _, d := range strings.Split(dirs, ",") {
		b, err := os.ReadFile(filepath.Join(d, name))
		if err != nil {
			continue
		}
		must(json.Unmarshal(b, v), "decode %s", filepath.Join(d, name))
		loaded = append(loaded, strings.TrimPrefix(filepath.Join(d, name), repoRoot()+"/"))
		return true
	}
	return false
}

// phaseStatus is the status phases.txt records for a phase ("ok", "FAILED", "skipped"), or "".
func phaseStatus(name string) string {
	for _, d := range strings.Split(*dir, ",") {
		p, err := os.ReadFile(filepath.Join(d, "phases.txt"))
		if err != nil {
			continue
		}
		for _, l := range strings.Split(string(p), "\n") {
			if f := strings.Fields(l); len(f) >= 2 && f[0] == name {
				return f[1]
			}
		}
	}
	return ""
}

// notRun says why a spares-on figure is missing.
func notRun(st *storage) string {
	switch phaseStatus("cstart-ts-spares" + st.sfx) {
	case "skipped":
		return "not run (BENCH_SPARES=0)"
	case "FAILED":
		return "**FAILED** (spares not taken or the config key rejected; see cstart-ts-spares" + st.sfx + ".log)"
	}
	return "not run"
}

func reportStorage(w func(string, ...interface{}), s *storage) {
	ts, dm, st, fl := s.ts, s.dm, s.st, s.fl
	haveTS, haveDM, haveST, haveFL := s.haveTS, s.haveDM, s.haveST, s.haveFL
	lat := func(r snapResult, parent bool, op string) Stats {
		if parent {
			return r.Latency.WithParent[op]
		}
		return r.Latency.NoParent[op]
	}
	flo := func(parent bool, op string) Stats {
		m := fl.NoParent
		if parent {
			m = fl.WithParent
		}
		if op == "view" {
			op = "prepare"
		}
		return m[op]
	}

	// Targets first.
	w("## Targets")
	w("")
	w("| target | measured | |")
	w("|---|---|---|")
	if haveTS && haveDM {
		for _, parent := range []bool{false, true} {
			c := "no parent"
			if parent {
				c = "with parent"
			}
			for _, t := range []struct {
				op   string
				want float64
			}{{"prepare", 5}, {"commit", 3}, {"remove_active", 3}, {"remove_committed", 3}} {
				a, d := lat(ts, parent, t.op).P50, lat(dm, parent, t.op).P50
				if a == 0 || d == 0 {
					continue
				}
				r := float64(d) / float64(a)
				w("| %s p50 at least %.0fx faster than devmapper (%s) | %.2fx (%s vs %s) | %s |", t.op, t.want, c, r, ms(a), ms(d), yes(r >= t.want))
			}
		}
	}
	if haveTS && haveFL {
		for _, parent := range []bool{false, true} {
			c := "no parent"
			if parent {
				c = "with parent"
			}
			a, f := lat(ts, parent, "prepare").P50, flo(parent, "prepare").P50
			if a != 0 && f != 0 {
				r := float64(a) / float64(f)
				w("| prepare p50 within 1.5x of the floor (%s) | %.2fx (%s vs %s) | %s |", c, r, ms(a), ms(f), yes(r <= 1.5))
			}
		}
	}
	if haveST && st.ColdAllS > 0 {
		m := maxf(st.WarmAllS)
		w("| start-up with %d snapshots (%d active devices), every call served in under 1 s | restart: %.3f s median, %.3f s worst of %d; after a reboot: %.3f s (reads %.3f s) | %s |",
			st.Snapshots, st.ActiveDevices, median(st.WarmAllS), m, len(st.WarmAllS), st.ColdAllS, st.ColdReadsS, yes(m < 1 && st.ColdAllS < 1))
	} else if haveST {
		m := maxf(st.WarmReadyS)
		w("| start-up with %d snapshots (%d active devices) under 1 s | restart: %.3f s median, %.3f s worst of %d; after a reboot (pool and %d devices re-made): %.3f s | %s |",
			st.Snapshots, st.ActiveDevices, median(st.WarmReadyS), m, len(st.WarmReadyS), st.ColdAfter, st.ColdReadyS, yes(m < 1))
	}
	if haveTS {
		kb := ts.MemoryIdle["rss_fresh_kb"]
		extra := ""
		if haveST {
			if st.RSSIdlePopulated > kb {
				kb = st.RSSIdlePopulated
			}
			extra = fmt.Sprintf("; with %d snapshots: %s", st.Snapshots, mib(st.RSSIdlePopulated))
		}
		w("| idle resident memory under 20 MiB | fresh: %s%s | %s |", mib(ts.MemoryIdle["rss_fresh_kb"]), extra, yes(kb < 20*1024))
	}
	targets13(w, s)
	w("")

	if haveTS || haveDM {
		w("## (b) Latency per call (calls of each kind and case: thinsnap %d, devmapper %d)", ts.Latency.NoParent["prepare"].N, dm.Latency.NoParent["prepare"].N)
		w("")
		w("\"with parent\": on top of a chain of %d committed snapshots. Remove (active) removes a view (an active device); Remove (committed) a committed snapshot. View's floor is Prepare's (the same kernel work). Stat (no kernel work: the RPC path and a store read) is there to split thinsnap's time: Prepare - floor - Stat is what the store, locking and extra ioctls add.", ts.Latency.ChainDepth)
		w("")
		w("thinsnap fsyncs/call: durable store writes (sled flushes, one fsync each on a disk) per call, from thinsnap's `thinsnap_store_flushes_total` read before and after each run of one kind of call (\"-\": not counted in that run).")
		w("")
		w("| call | case | thinsnap p50 | thinsnap p99 | thinsnap fsyncs/call | devmapper p50 | devmapper p99 | floor p50 | floor p99 | devmapper / thinsnap (p50) | devmapper / thinsnap (p99) | thinsnap / floor (p50) | thinsnap / floor (p99) |")
		w("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
		for _, op := range []string{"prepare", "view", "commit", "remove_active", "remove_committed", "stat"} {
			for _, parent := range []bool{false, true} {
				c := "no parent"
				if parent {
					c = "with parent"
				}
				a, d, f := lat(ts, parent, op), lat(dm, parent, op), flo(parent, op)
				fs := "-"
				if a.FsyncsPerCall != nil {
					fs = fmt.Sprintf("%.2f", *a.FsyncsPerCall)
				}
				w("| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |", op, c, ms(a.P50), ms(a.P99), fs, ms(d.P50), ms(d.P99), ms(f.P50), ms(f.P99),
					ratio(float64(d.P50), float64(a.P50)), ratio(float64(d.P99), float64(a.P99)),
					ratio(float64(a.P50), float64(f.P50)), ratio(float64(a.P99), float64(f.P99)))
			}
		}
		w("")

		w("## (a) containerd's benchsuite loop: 16 layers, Prepare -> write 1 MiB files -> Commit")
		w("")
		w("%d iterations each (every iteration starts from a parentless layer; the pool is emptied between iterations, untimed). Per iteration: mean seconds over the iterations; per call: p50.", ts.Benchsuite.Iterations)
		w("")
		w("| step | thinsnap | devmapper | devmapper / thinsnap |")
		w("|---|---|---|---|")
		row := func(name string, a, d float64, unit string) {
			w("| %s | %.3f %s | %.3f %s | %s |", name, a, unit, d, unit, ratio(d, a))
		}
		row("total per iteration", mean(ts.Benchsuite.TotalS), mean(dm.Benchsuite.TotalS), "s")
		row("Prepare, per iteration", mean(ts.Benchsuite.PrepareS), mean(dm.Benchsuite.PrepareS), "s")
		row("mount + write + unmount, per iteration", mean(ts.Benchsuite.WriteS), mean(dm.Benchsuite.WriteS), "s")
		row("Commit, per iteration", mean(ts.Benchsuite.CommitS), mean(dm.Benchsuite.CommitS), "s")
		w("| Prepare, per call (p50) | %s | %s | %s |", ms(ts.Benchsuite.Prepare.P50), ms(dm.Benchsuite.Prepare.P50), ratio(float64(dm.Benchsuite.Prepare.P50), float64(ts.Benchsuite.Prepare.P50)))
		w("| Prepare of the parentless first layer (p50) | %s | %s | %s |", ms(ts.Benchsuite.PrepareFirst.P50), ms(dm.Benchsuite.PrepareFirst.P50), ratio(float64(dm.Benchsuite.PrepareFirst.P50), float64(ts.Benchsuite.PrepareFirst.P50)))
		w("| write, per layer (p50) | %s | %s | %s |", ms(ts.Benchsuite.Write.P50), ms(dm.Benchsuite.Write.P50), ratio(float64(dm.Benchsuite.Write.P50), float64(ts.Benchsuite.Write.P50)))
		w("| Commit, per call (p50) | %s | %s | %s |", ms(ts.Benchsuite.Commit.P50), ms(dm.Benchsuite.Commit.P50), ratio(float64(dm.Benchsuite.Commit.P50), float64(ts.Benchsuite.Commit.P50)))
		w("")

		w("## (c) Throughput from %d concurrent clients", ts.Concurrent.Clients)
		w("")
		w("Each client makes %d Prepares on the top of the %d-deep chain, then all of them are removed by the same clients. thinsnap: one gRPC connection per client; devmapper: one snapshotter instance shared, as in containerd.", ts.Concurrent.OpsPerClient, ts.Latency.ChainDepth)
		w("")
		w("| | thinsnap | devmapper | thinsnap / devmapper |")
		w("|---|---|---|---|")
		w("| Prepare throughput | %.1f /s | %.1f /s | %s |", ts.Concurrent.PreparePerS, dm.Concurrent.PreparePerS, ratio(ts.Concurrent.PreparePerS, dm.Concurrent.PreparePerS))
		w("| Remove throughput | %.1f /s | %.1f /s | %s |", ts.Concurrent.RemovePerS, dm.Concurrent.RemovePerS, ratio(ts.Concurrent.RemovePerS, dm.Concurrent.RemovePerS))
		w("| Prepare latency under load p50 / p99 | %s / %s | %s / %s | |", ms(ts.Concurrent.PrepareLatency.P50), ms(ts.Concurrent.PrepareLatency.P99), ms(dm.Concurrent.PrepareLatency.P50), ms(dm.Concurrent.PrepareLatency.P99))
		w("| Remove latency under load p50 / p99 | %s / %s | %s / %s | |", ms(ts.Concurrent.RemoveLatency.P50), ms(ts.Concurrent.RemoveLatency.P99), ms(dm.Concurrent.RemoveLatency.P50), ms(dm.Concurrent.RemoveLatency.P99))
		w("")
	}

	if haveST {
		w("## (d) Start-up with %d snapshots in the store and %d active devices", st.Snapshots, st.ActiveDevices)
		w("")
		w("The store was filled through the API by %d clients: %d chains of committed layers with an active snapshot on each (%.0f s, %.0f calls/s). Ready = from exec to the socket accepting a connection; first call = a new connection and a Stat answered after that.", *clients, st.ActiveDevices, st.PopulateS, float64(2*st.Snapshots-st.ActiveDevices)/st.PopulateS)
		w("")
		w("| | time | target (1 s) |")
		w("|---|---|---|")
		w("| first start on a new pool (loop files, pool, base mkfs; empty store) | %.3f s | |", st.FirstStartS)
		w("| restart, devices still active: ready (median / worst of %d) | %.3f s / %.3f s | %s |", len(st.WarmReadyS), median(st.WarmReadyS), maxf(st.WarmReadyS), ratio(maxf(st.WarmReadyS), 1))
		w("| restart: first call answered (median) | %.3f s | |", median(st.WarmFirstCallS))
		w("| after a reboot (no dm or loop devices: pool re-made, %d -> %d devices re-activated): socket | %.3f s | %s |", st.ColdBefore, st.ColdAfter, st.ColdReadyS, ratio(st.ColdReadyS, 1))
		if st.ColdAllS > 0 {
			w("| restart: reads served / every call served, from exec (median) | %.3f s / %.3f s | %s |", median(st.WarmReadsS), median(st.WarmAllS), ratio(maxf(st.WarmAllS), 1))
			w("| after a reboot: reads served / every call served, from exec | %.3f s / %.3f s | %s |", st.ColdReadsS, st.ColdAllS, ratio(st.ColdAllS, 1))
		}
		w("| after a reboot: first call answered | %.3f s | |", st.ColdFirstCallS)
		w("| stop (SIGTERM to exit, median) | %.3f s | |", median(st.StopS))
		w("| List of all %d snapshots (one Walk) | %.3f s | |", st.Snapshots, st.ListAllS)
		w("")
	}

	if haveTS || haveST {
		w("## (e) thinsnap resident memory (VmRSS)")
		w("")
		w("| state | VmRSS | target (20 MiB) |")
		w("|---|---|---|")
		if haveTS {
			w("| idle, new pool, empty store | %s | %s |", mib(ts.MemoryIdle["rss_fresh_kb"]), ratio(float64(ts.MemoryIdle["rss_fresh_kb"]), 20*1024))
			w("| under (c), %d concurrent clients: max / mean of 20 ms samples | %s / %s | |", ts.Concurrent.Clients, mib(ts.MemoryConcurrent["rss_max_kb"]), mib(ts.MemoryConcurrent["rss_mean_kb"]))
			w("| idle after (a)-(c) | %s | |", mib(ts.MemoryIdle["rss_after_kb"]))
		}
		if haveST {
			w("| idle with %d snapshots, right after filling | %s | %s |", st.Snapshots, mib(st.RSSIdlePopulated), ratio(float64(st.RSSIdlePopulated), 20*1024))
			if len(st.WarmRSSKB) > 0 {
				w("| idle with %d snapshots, after a restart | %s | %s |", st.Snapshots, mib(st.WarmRSSKB[len(st.WarmRSSKB)-1]), ratio(float64(st.WarmRSSKB[len(st.WarmRSSKB)-1]), 20*1024))
			}
		}
		w("")
	}

	if haveFL {
		w("## (f) The floor: bare device-mapper ioctls per call, %d each", fl.Ops)
		w("")
		w("| step | no parent p50 | no parent p99 | with parent p50 | with parent p99 |")
		w("|---|---|---|---|---|")
		for _, k := range []string{"prepare", "prepare.create_snap", "prepare.device_create", "prepare.table_load", "prepare.resume", "activate", "commit", "remove_active", "remove_committed"} {
			a, c := fl.NoParent[k], fl.WithParent[k]
			w("| %s | %s | %s | %s | %s |", k, ms(a.P50), ms(a.P99), ms(c.P50), ms(c.P99))
		}
		w("")
		w("prepare = message `create_snap` + device create + table load + resume; commit = thin status + device remove; remove_active = device remove + message `delete`; remove_committed = message `delete`; activate = device create + table load + resume of a thin device that has none (after a reboot).")
		w("")
	}

	reportNew(w, s)
}

func runReport() {
	var env envInfo
	haveEnv := load(*dir, "env.json", &env)
	var disk struct {
		Disk string `json:"disk"`
	}
	haveDisk := load(*dir, "disk.json", &disk)
	var stors []*storage
	for _, s := range []struct{ name, sfx string }{{"tmpfs", ""}, {"disk", "-disk"}} {
		if st := loadStorage(s.name, s.sfx); st.any() {
			stors = append(stors, st)
		}
	}

	var b strings.Builder
	w := func(format string, args ...interface{}) { fmt.Fprintf(&b, format+"\n", args...) }
	w("# thinsnap benchmark results")
	w("")
	w("Generated by `benches/driver -mode report` (%s) from `%s`; see benches/README.md for",
		time.Now().UTC().Format("2006-01-02 15:04 UTC"), strings.Join(loaded, "`, `"))
	w("what each figure measures. Do not edit by hand: rerun the command.")
	w("")
	w("- **Command:** `%s`", *command)
	if haveEnv {
		w("- **Kernel:** `%s` (guest), %d vCPUs, %d MiB, CPU `%s`, booted by virtme-ng with **software emulation (TCG, no KVM)**: absolute times are 5-20x a real machine's; compare ratios, not absolute times.", env.Kernel, env.VCPUs, env.MemMiB, env.CPU)
		w("- **Pool settings, identical for every pool** (thinsnap's, devmapper's, the floor's; each fresh, one after the other): data %d MiB and metadata %d MiB sparse files on loop devices on the storage of the section (tmpfs or disk), block size %d KiB, low-water mark 1%%, `skip_block_zeroing`; ext4, base size %d MiB. %s; %s.", env.DataMiB, env.MetaMiB, env.BlockKiB, env.BaseMiB, env.Dmsetup, env.Mkfs)
		for _, d := range strings.Split(*dir, ",") {
			var e envInfo
			b, err := os.ReadFile(filepath.Join(d, "env.json"))
			if err != nil || json.Unmarshal(b, &e) != nil {
				continue
			}
			ph := ""
			if p, err := os.ReadFile(filepath.Join(d, "phases.txt")); err == nil {
				ph = strings.Join(strings.Fields(strings.ReplaceAll(string(p), "\n", ";")), " ")
			}
			w("- **Run `%s`:** started %s, **counts** `%s`; phases (name, status, seconds): %s", filepath.Base(d), e.Started, e.Counts, ph)
		}
	}
	w("- **thinsnap:** release build, `thinsnap serve` driven through containerd 1.6's own proxy snapshotter client (`snapshots/proxy` over gRPC on the unix socket, containerd's dial options), default logging (info) to a file next to its store.")
	w("- **containerd devmapper:** containerd 1.6.20's `snapshots/devmapper` (Debian `golang-github-containerd-containerd-dev`), called in process through its Go package (no gRPC hop, which favours it), `base_image_size` as above, ext4, its metadata on the storage of the section.")
	w("- **floor:** `benches/dm_floor.rs`, the same `devicemapper` crate thinsnap uses, bare ioctls on a pool of its own.")
	w("- **Storages:** `tmpfs` = pool files and every store (thinsnap's root, devmapper's root, the floor's pool files) on the guest's tmpfs; `disk` = the same on ext4 on a sparse raw image attached to the VM with `vng --disk` (a virtio disk, qemu's default cache)%s. Every ratio is taken within one storage.", map[bool]string{true: ": `" + disk.Disk + "`", false: ""}[haveDisk])

	w("")
	sideBySide(w, stors)
	for _, st := range stors {
		w("# Storage: %s", st.name)
		w("")
		reportStorage(w, st)
	}

	if notes, err := os.ReadFile(filepath.Join(repoRoot(), "benches", "NOTES.md")); err == nil {
		w("%s", strings.TrimRight(string(notes), "\n"))
	}
	must(os.WriteFile(*out, []byte(b.String()), 0644), "write %s", *out)
	logf("wrote %s", *out)
}

func repoRoot() string {
	if r := os.Getenv("BENCH_REPO"); r != "" {
		return r
	}
	wd, _ := os.Getwd()
	return wd
}
