package main

// -mode cstart: the container-start path of a pulled image (benches/README.md, (g)), and with
// spares on, (b)'s Prepare and View on a parent that has a spare. Also the memory and metrics
// helpers the other modes share.

import (
	"bufio"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/containerd/containerd/mount"
	"github.com/containerd/containerd/snapshots"
	"github.com/containerd/containerd/snapshots/devmapper"
	"github.com/containerd/containerd/snapshots/overlay"
	"github.com/sirupsen/logrus"
)

// memDetail reads VmRSS, RssAnon, RssFile and RssShmem (KiB) of pid from /proc/PID/status.
func memDetail(pid int) map[string]int64 {
	m := map[string]int64{}
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return m
	}
	defer f.Close()
	keys := map[string]string{"VmRSS:": "vmrss_kb", "RssAnon:": "rss_anon_kb", "RssFile:": "rss_file_kb", "RssShmem:": "rss_shmem_kb", "VmHWM:": "hwm_kb"}
	s := bufio.NewScanner(f)
	for s.Scan() {
		fields := strings.Fields(s.Text())
		if len(fields) < 2 {
			continue
		}
		if k, ok := keys[fields[0]]; ok {
			v, _ := strconv.ParseInt(fields[1], 10, 64)
			m[k] = v
		}
	}
	return m
}

// settleMem is memDetail of an idle daemon: 5 s without calls.
func settleMem(pid int) map[string]int64 {
	time.Sleep(5 * time.Second)
	return memDetail(pid)
}

// scrapeMetric reads metric NAME from a Prometheus text endpoint, summed over its labelled
// series if it has any; ok is false when the endpoint does not serve it.
func scrapeMetric(url, name string) (float64, bool) {
	resp, err := http.Get(url)
	must(err, "GET %s", url)
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	sum, ok := 0.0, false
	for sc.Scan() {
		l := sc.Text()
		if strings.HasPrefix(l, "#") || !(strings.HasPrefix(l, name+" ") || strings.HasPrefix(l, name+"{")) {
			continue
		}
		f := strings.Fields(l[strings.LastIndex(l, "}")+1:])
		if len(f) >= 2 && f[0] == name {
			f = f[1:]
		}
		if len(f) == 0 {
			continue
		}
		v, err := strconv.ParseFloat(f[0], 64)
		must(err, "parse %q", l)
		sum, ok = sum+v, true
	}
	return sum, ok
}

var (
	csTarget     = flag.String("target", "thinsnap", "cstart: thinsnap, devmapper or overlayfs (containerd's overlay snapshotter in process, on -root)")
	csBurst      = flag.Int("burst", 10, "cstart: Prepares started at once on the image's top layer in one burst (0: no burst)")
	csBursts     = flag.Int("bursts", 3, "cstart: bursts timed (what they made is removed, untimed, between them)")
	csContainers = flag.Int("containers", 50, "cstart: containers started")
	csLayers     = flag.Int("layers", 5, "cstart: committed layers of the image")
	csSpares     = flag.Int("spares", 0, "cstart: thinsnap's [spares] count in -config (0: off); >0 makes the driver wait for a spare before each timed call and fail if none is taken")
	csSpareWait  = flag.Duration("spare-wait", 60*time.Second, "cstart: bound on the untimed wait for every wanted spare to be ready")
	fillClients  = flag.Int("fill-clients", 16, "(d) concurrent clients filling the store")
	firstMounts  = flag.Int("first-mounts", 20, "(d) inactive snapshots whose first Mounts is timed after the reboot")
)

// spareCount reads warm spares' figure `name` (ready, taken or missed) live from `thinsnap
// status --json` (the admin socket): /metrics refreshes its values at most every 5 s
// (metrics::REFRESH_EVERY), which made the waits go early and the counts lag the calls.
func spareCount(url, name string) (float64, bool) {
	if *bin == "" || *config == "" {
		return scrapeMetric(url, map[string]string{"ready": "thinsnap_spares_ready",
			"taken": "thinsnap_spares_taken_total", "missed": "thinsnap_spares_missed_total"}[name])
	}
	outb, err := exec.Command(*bin, "status", "--config", *config, "--json").Output()
	must(err, "thinsnap status --json")
	var st struct {
		Spares map[string]interface{} `json:"spares"`
	}
	must(json.Unmarshal(outb, &st), "parse thinsnap status --json")
	v, ok := st.Spares[name].(float64)
	return v, ok
}

// spareWatch waits for spares and counts what thinsnap says it took and missed.
type spareWatch struct {
	url                   string
	on                    bool
	taken0, missed0       float64
	waits, timeouts       int
	waitTotal             time.Duration
	readyMissing          bool
	takenMissing, missing bool
}

func newSpareWatch(url string, on bool) *spareWatch {
	w := &spareWatch{url: url, on: on}
	if url == "" {
		return w
	}
	var ok bool
	w.taken0, ok = spareCount(url, "taken")
	if !ok && on {
		must(fmt.Errorf("thinsnap serves no thinsnap_spares_taken_total: this binary has no spares"), "spares on")
	}
	w.missed0, _ = spareCount(url, "missed")
	return w
}

// wanted is how many spares thinsnap keeps here once refilled: one of the base and one of each
// of the most recently used or committed parents (the image's layers), `[spares] count` in all.
func wanted() float64 {
	n := *csSpares
	if *csLayers+1 < n {
		n = *csLayers + 1
	}
	return float64(n)
}

// wait blocks (untimed) until every wanted spare is ready (thinsnap_spares_ready reaches
// wanted()), at most -spare-wait. Waiting for just one would let a call go while the spare of
// its own parent is still being remade (the base's spare counts as ready too), and time the
// usual path under the spares-on label.
func (w *spareWatch) wait() {
	if !w.on {
		return
	}
	t := time.Now()
	w.waits++
	for {
		v, ok := spareCount(w.url, "ready")
		if !ok {
			must(fmt.Errorf("thinsnap serves no thinsnap_spares_ready: this binary has no spares"), "spares on")
		}
		if v >= wanted() {
			break
		}
		if time.Since(t) > *csSpareWait {
			w.timeouts++
			logf("spares: none ready after %s; timing the call anyway (counted as a wait timeout)", *csSpareWait)
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	w.waitTotal += time.Since(t)
}

// settle blocks (untimed) until thinsnap's ready spares have not changed for a second, at most
// -spare-wait: the refiller has done what it wanted, as after a quiet spell on a node. Nothing
// with spares off.
func (w *spareWatch) settle() {
	if !w.on {
		return
	}
	t := time.Now()
	last, since := -1.0, time.Now()
	for time.Since(since) < time.Second && time.Since(t) < *csSpareWait {
		v, _ := spareCount(w.url, "ready")
		if v != last {
			last, since = v, time.Now()
		}
		time.Sleep(50 * time.Millisecond)
	}
	w.waits++
	w.waitTotal += time.Since(t)
}

func (w *spareWatch) counts() map[string]interface{} {
	if w.url == "" {
		return nil
	}
	taken, _ := spareCount(w.url, "taken")
	missed, _ := spareCount(w.url, "missed")
	m := map[string]interface{}{"taken": taken - w.taken0, "missed": missed - w.missed0}
	if w.on {
		m["waits"], m["wait_timeouts"], m["wait_total_s"] = w.waits, w.timeouts, w.waitTotal.Seconds()
	}
	return m
}

// imageChain commits `layers` layers of a few small files each, as an unpacked image.
func imageChain(ctx context.Context, sn snapshots.Snapshotter, tag string, layers int) (string, []string) {
	parent := ""
	var names []string
	for l := 0; l < layers; l++ {
		key := fmt.Sprintf("%s-unpack-%d", tag, l)
		mounts, err := sn.Prepare(ctx, key, parent)
		must(err, "image prepare %s", key)
		must(mount.WithTempMount(ctx, mounts, func(root string) error {
			dir := filepath.Join(root, fmt.Sprintf("layer%d", l))
			if err := os.MkdirAll(dir, 0755); err != nil {
				return err
			}
			for i := 0; i < 4; i++ {
				b := []byte(strings.Repeat(fmt.Sprintf("layer %d file %d\n", l, i), 256))
				if err := os.WriteFile(filepath.Join(dir, fmt.Sprintf("f%d", i)), b, 0644); err != nil {
					return err
				}
			}
			return nil
		}), "image write %s", key)
		name := fmt.Sprintf("%s-layer-%d", tag, l)
		must(sn.Commit(ctx, name, key), "image commit %s", key)
		names = append(names, name)
		parent = name
	}
	return parent, names
}

// containerStarts times, per container, Prepare of its writable layer on `top` -> Mounts ->
// mount; the umount and Remove after it are not timed.
func containerStarts(ctx context.Context, sn snapshots.Snapshotter, tag, top string, n int, sw *spareWatch) map[string]interface{} {
	var total, prep, mnts, mnt []time.Duration
	target, err := os.MkdirTemp("", "cstart-")
	must(err, "mkdtemp")
	for i := 0; i < n; i++ {
		key := fmt.Sprintf("%s-ctr-%d", tag, i)
		sw.wait()
		t0 := time.Now()
		_, err := sn.Prepare(ctx, key, top)
		t1 := time.Now()
		must(err, "container prepare %s", key)
		ms, err := sn.Mounts(ctx, key)
		t2 := time.Now()
		must(err, "container mounts %s", key)
		err = mount.All(ms, target)
		t3 := time.Now()
		must(err, "container mount %s", key)
		total, prep = append(total, t3.Sub(t0)), append(prep, t1.Sub(t0))
		mnts, mnt = append(mnts, t2.Sub(t1)), append(mnt, t3.Sub(t2))
		must(mount.UnmountAll(target, 0), "umount %s", target)
		must(sn.Remove(ctx, key), "container remove %s", key)
		if (i+1)%25 == 0 || i+1 == n {
			logf("cstart %s: %d/%d containers", tag, i+1, n)
		}
	}
	os.Remove(target)
	return map[string]interface{}{"start": summarize(total), "prepare": summarize(prep),
		"mounts": summarize(mnts), "mount": summarize(mnt)}
}

// parentLatency times n Prepares and then n Views on `parent` (waiting for a spare before each
// when spares are on); what they made is removed, untimed, after each series.
func parentLatency(ctx context.Context, sn snapshots.Snapshotter, tag, parent string, n int, sw *spareWatch) map[string]Stats {
	res := map[string]Stats{}
	for _, kind := range []string{"prepare", "view"} {
		var lat []time.Duration
		var keys []string
		for i := 0; i < n; i++ {
			key := fmt.Sprintf("%s-%s-%d", tag, kind, i)
			sw.wait()
			t := time.Now()
			var err error
			if kind == "prepare" {
				_, err = sn.Prepare(ctx, key, parent)
			} else {
				_, err = sn.View(ctx, key, parent)
			}
			lat = append(lat, time.Since(t))
			must(err, "%s %s", kind, key)
			keys = append(keys, key)
		}
		for _, k := range keys {
			must(sn.Remove(ctx, k), "remove %s", k)
		}
		res[kind] = summarize(lat)
	}
	return res
}

// bursts times `rounds` bursts of n Prepares started at once (one goroutine each, released
// together) on `parent`: every call's own latency (p50/p99 over all bursts) and each burst's wall
// time (the first call's start to the last call's end). With spares on, each burst starts once
// the wanted spares are ready (untimed), as after a quiet spell on a node; what a burst made is
// removed, untimed, before the next.
func bursts(ctx context.Context, sn snapshots.Snapshotter, tag, parent string, n, rounds int, sw *spareWatch) map[string]interface{} {
	var lat, wall []time.Duration
	for r := 0; r < rounds; r++ {
		sw.wait()
		var mu sync.Mutex
		var wg sync.WaitGroup
		start := make(chan struct{})
		keys := make([]string, n)
		errs := make([]error, n)
		for i := 0; i < n; i++ {
			keys[i] = fmt.Sprintf("%s-burst-%d-%d", tag, r, i)
			wg.Add(1)
			go func(i int) {
				defer wg.Done()
				<-start
				t := time.Now()
				_, errs[i] = sn.Prepare(ctx, keys[i], parent)
				d := time.Since(t)
				mu.Lock()
				lat = append(lat, d)
				mu.Unlock()
			}(i)
		}
		t0 := time.Now()
		close(start)
		wg.Wait()
		wall = append(wall, time.Since(t0))
		for i, err := range errs {
			must(err, "burst prepare %s", keys[i])
		}
		for _, k := range keys {
			must(sn.Remove(ctx, k), "remove %s", k)
		}
		logf("burst %d/%d of %d Prepares: %s", r+1, rounds, n, wall[len(wall)-1])
	}
	return map[string]interface{}{"n": n, "rounds": rounds, "prepare": summarize(lat), "wall": summarize(wall)}
}

func runCstart() {
	ctx := context.Background()
	res := map[string]interface{}{"snapshotter": *csTarget, "layers": *csLayers, "containers": *csContainers, "spares": *csSpares}
	var sn snapshots.Snapshotter
	var d *daemon
	switch *csTarget {
	case "devmapper":
		logrus.SetLevel(logrus.WarnLevel)
		s, err := devmapper.NewSnapshotter(ctx, &devmapper.Config{RootPath: *root, PoolName: *pool, BaseImageSize: *baseSize})
		must(err, "devmapper.NewSnapshotter")
		sn = s
	case "overlayfs":
		s, err := overlay.NewSnapshotter(*root)
		must(err, "overlay.NewSnapshotter")
		sn = s
	case "thinsnap":
		d = &daemon{bin: *bin, config: *config, sock: *sock, logPath: *logPath}
		// A spares config key the binary does not know makes `serve` exit: start() fails loudly.
		r := d.start()
		logf("thinsnap ready after %s", r)
		var c interface{ Close() error }
		sn, c = dial(*sock)
		defer c.Close()
		cfgText, _ := os.ReadFile(*config)
		res["config_toml"] = string(cfgText)
	default:
		must(fmt.Errorf("unknown -target %q", *csTarget), "cstart")
	}
	on := *csSpares > 0
	if on && (*csTarget != "thinsnap" || *metricsURL == "") {
		must(fmt.Errorf("-spares needs -target thinsnap and -metrics"), "cstart")
	}
	url := ""
	if *csTarget == "thinsnap" {
		url = *metricsURL
	}
	tag := "cs"
	top, layers := imageChain(ctx, sn, tag, *csLayers)
	logf("cstart: image of %d layers committed; %d containers on %s (spares %d)", *csLayers, *csContainers, top, *csSpares)
	sw := newSpareWatch(url, on)
	res["container_start"] = containerStarts(ctx, sn, tag, top, *csContainers, sw)
	if sw.url != "" {
		res["container_start_spares"] = sw.counts()
	}
	writeJSON(*out+".partial", res)
	if *csBurst > 0 && *csBursts > 0 {
		logf("cstart: %d bursts of %d Prepares at once on %s", *csBursts, *csBurst, top)
		sw3 := newSpareWatch(url, on)
		res["burst"] = bursts(ctx, sn, tag+"-b", top, *csBurst, *csBursts, sw3)
		if sw3.url != "" {
			res["burst_spares"] = sw3.counts()
		}
		writeJSON(*out+".partial", res)
	}
	if *upLayers > 0 && *upRounds > 0 {
		logf("cstart: %d unpacks of an image of %d layers", *upRounds, *upLayers)
		sw4 := newSpareWatch(url, on)
		res["unpack"] = unpacks(ctx, sn, tag+"-u", *upLayers, *upRounds, *upKiB, sw4.settle)
		if sw4.url != "" {
			res["unpack_spares"] = sw4.counts()
		}
		writeJSON(*out+".partial", res)
	}
	if *csTarget == "thinsnap" {
		// (b)'s Prepare and View on a parent, here the image's top layer, with this run's spares.
		logf("cstart: %d Prepares and %d Views on %s", *ops, *ops, top)
		sw2 := newSpareWatch(url, on)
		res["parent_latency"] = parentLatency(ctx, sn, tag+"-lat", top, *ops, sw2)
		if sw2.url != "" {
			res["parent_latency_spares"] = sw2.counts()
		}
		res["memory_after"] = settleMem(d.pid())
	}
	removeAll(ctx, sn, layers)
	if d != nil {
		d.stop()
	} else {
		must(sn.Close(), "devmapper close")
	}
	if on {
		// Never report spares-off figures as spares-on.
		for _, k := range []string{"container_start_spares", "parent_latency_spares"} {
			if m, ok := res[k].(map[string]interface{}); !ok || m["taken"].(float64) < 1 {
				writeJSON(*out+".failed", res)
				must(fmt.Errorf("thinsnap_spares_taken_total did not grow during %s (results kept in %s.failed, not reported)", k, *out), "spares on")
			}
		}
	}
	writeJSON(*out, res)
}
