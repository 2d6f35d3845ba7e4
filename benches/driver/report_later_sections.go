package main

// The report's later sections (report.go has (a) to (f)), added for issue 13: (g) container
// start, (h) Prepare and View on a parent with spares off and on, (d') the start after a reboot
// with lazy activation, (e') RssAnon/RssFile, and the side-by-side table of both storages.

import "fmt"

func p50(s Stats) float64 { return float64(s.P50) }

// csOnMissing is why the spares-on figures are missing, or "".
func (s *storage) csOnMissing() string {
	if s.haveCSOn {
		return ""
	}
	return notRun(s)
}

func sparesCounts(m map[string]float64) string {
	if m == nil {
		return "–"
	}
	t := fmt.Sprintf("taken %.0f, missed %.0f", m["taken"], m["missed"])
	if n, ok := m["wait_timeouts"]; ok && n > 0 {
		t += fmt.Sprintf(", **%.0f waits timed out**", n)
	}
	return t
}

// floorActivate is the floor's activate-only p50 (device create + table load + resume of an
// existing thin device), from the no-parent series (an activation does not depend on the origin).
func (s *storage) floorActivate() Stats { return s.fl.NoParent["activate"] }

func reportNew(w func(string, ...interface{}), s *storage) {
	if s.haveCSOff || s.haveCSOn || s.haveCSDM {
		c := s.csOff
		if !s.haveCSOff {
			c = s.csDM
		}
		w("## (g) Container start of a pulled image: Prepare of the writable layer -> Mounts -> mount")
		w("")
		w("An image of %d committed layers (a few small files each, written through a mount as an unpacker would), then %d containers one after the other: Prepare of a writable layer on the top layer, Mounts, mount(2) of what it returned, timed as one path (start); umount and Remove after each, untimed. Each variant on a fresh pool of this storage. With spares on, the driver waits (untimed, bounded) before each start until every wanted spare is ready (`thinsnap_spares_ready` = min(count, layers + 1): the base's and one per recent layer), so every start is \"a Prepare on a parent that has a spare\"; taken/missed are the deltas of `thinsnap_spares_taken_total` / `thinsnap_spares_missed_total` over the series.", c.Layers, c.Containers)
		w("")
		w("| variant | start p50 | start p99 | Prepare p50 | Mounts p50 | mount p50 | devmapper / this (start p50) | spares |")
		w("|---|---|---|---|---|---|---|---|")
		dmP50 := p50(s.csDM.Start["start"])
		row := func(name string, r cstartResult, have bool, missing string, sp map[string]float64) {
			if !have {
				w("| %s | %s | | | | | | |", name, missing)
				return
			}
			st := r.Start
			w("| %s | %s | %s | %s | %s | %s | %s | %s |", name, ms(st["start"].P50), ms(st["start"].P99), ms(st["prepare"].P50), ms(st["mounts"].P50), ms(st["mount"].P50), ratio(dmP50, p50(st["start"])), sparesCounts(sp))
		}
		row("thinsnap, spares off", s.csOff, s.haveCSOff, "not run", s.csOff.StartSpares)
		onName := "thinsnap, spares on"
		if s.haveCSOn {
			onName = fmt.Sprintf("thinsnap, spares on (count %d)", s.csOn.Spares)
		}
		row(onName, s.csOn, s.haveCSOn, s.csOnMissing(), s.csOn.StartSpares)
		row("containerd devmapper", s.csDM, s.haveCSDM, "not run", nil)
		row("containerd overlayfs", s.csOV, s.haveCSOV, "not run", nil)
		if s.haveCSOV {
			w("")
			w("Against overlayfs (this / overlayfs, start p50): thinsnap spares off %s, spares on %s, devmapper %s.",
				ratioIf(s.haveCSOff, p50(s.csOff.Start["start"]), p50(s.csOV.Start["start"])),
				ratioIf(s.haveCSOn, p50(s.csOn.Start["start"]), p50(s.csOV.Start["start"])),
				ratioIf(s.haveCSDM, p50(s.csDM.Start["start"]), p50(s.csOV.Start["start"])))
		}
		w("")
	}
	reportBurstUnpack(w, s)
	reportFloorUdev(w, s)
	if s.haveCSOff || s.haveCSOn {
		w("## (h) Prepare and View on a parent, spares off and on")
		w("")
		w("%d Prepares, then %d Views, one at a time on the image's top layer of (g) (its own daemon and pool per variant, right after (g)); what they made is removed after each series, untimed. Floor: the floor's Prepare with a parent (a %d-deep chain), same storage.", s.csOff.Containers, s.csOff.Containers, s.fl.Chain)
		w("")
		w("| call | spares off p50 / p99 | spares on p50 / p99 | floor p50 | off / floor | on / floor | spares (on) |")
		w("|---|---|---|---|---|---|---|")
		f := s.fl.WithParent["prepare"]
		for _, op := range []string{"prepare", "view"} {
			off, on := s.csOff.ParentLatency[op], s.csOn.ParentLatency[op]
			onTxt, onRatio := s.csOnMissing(), "–"
			if s.haveCSOn {
				onTxt = ms(on.P50) + " / " + ms(on.P99)
				onRatio = ratio(p50(on), p50(f))
			}
			w("| %s | %s / %s | %s | %s | %s | %s | %s |", op, ms(off.P50), ms(off.P99), onTxt, ms(f.P50), ratio(p50(off), p50(f)), onRatio, sparesCounts(s.csOn.ParentSpares))
		}
		w("")
	}
	if s.haveST && s.st.ColdFirstMounts.N > 0 {
		st := s.st
		a := s.floorActivate()
		w("## (d') After a reboot: lazy activation")
		w("")
		w("`thinsnap pool destroy` without `--remove-files` (no dm or loop device left, the pool files and the store stay), then `thinsnap serve`: socket = exec to the socket accepting a connection; reads served = exec to the first Stat answered (a settled store answers it while the pool is still being made); every call served = exec to the first Update answered (a store write: it waits for the pool and recovery). Then, one after the other, the first Mounts of %d snapshots that have no device (each activates one), and a second Mounts of each (device active). One activation: the floor's activate-only figure (device create + table load + resume of an existing thin device), same storage.", st.ColdFirstMounts.N)
		w("")
		w("| | time | devices |")
		w("|---|---|---|")
		w("| socket accepts, from exec | %.3f s | %d before, %d after the start |", st.ColdReadyS, st.ColdBefore, st.ColdAfter)
		w("| first call (Stat) answered, after the socket | %.3f s | |", st.ColdFirstCallS)
		if st.ColdAllS > 0 {
			w("| reads served (first Stat answered), from exec | %.3f s | |", st.ColdReadsS)
			w("| every call served (first Update answered), from exec | %.3f s | |", st.ColdAllS)
		}
		w("| first Mounts of an inactive snapshot, p50 / p99 | %s / %s | %d after the Mounts |", ms(st.ColdFirstMounts.P50), ms(st.ColdFirstMounts.P99), st.ColdAfterMounts)
		w("| second Mounts of the same, p50 | %s | |", ms(st.ColdSecondMounts.P50))
		w("| floor: one activation, p50 / p99 | %s / %s | |", ms(a.P50), ms(a.P99))
		w("| first Mounts / one activation (p50) | %s | |", ratio(p50(st.ColdFirstMounts), p50(a)))
		w("")
	}
	memRow := func(state string, m map[string]int64) {
		if len(m) == 0 {
			return
		}
		w("| %s | %s | %s | %s | %s |", state, mib(m["vmrss_kb"]), mib(m["rss_anon_kb"]), mib(m["rss_file_kb"]), mib(m["rss_shmem_kb"]))
	}
	if len(s.ts.MemoryDetail) > 0 || len(s.st.MemoryDetail) > 0 {
		w("## (e') thinsnap resident memory split: RssAnon vs RssFile")
		w("")
		w("From `/proc/PID/status`, the daemon idle for 5 s in each state.")
		w("")
		w("| state | VmRSS | RssAnon | RssFile | RssShmem |")
		w("|---|---|---|---|---|")
		memRow("idle, new pool, empty store", s.ts.MemoryDetail["idle_fresh"])
		memRow("idle after the load (a)-(c)", s.ts.MemoryDetail["idle_after"])
		memRow("start-up phase: idle, empty store", s.st.MemoryDetail["idle_empty"])
		memRow(fmt.Sprintf("idle after the fill (%d snapshots)", s.st.Snapshots), s.st.MemoryDetail["idle_filled"])
		memRow("idle after the start following a reboot", s.st.MemoryDetail["cold_idle"])
		memRow("after (g) and (h), spares off", s.csOff.MemoryAfter)
		memRow("after (g) and (h), spares on", s.csOn.MemoryAfter)
		w("")
	}
}

// targets13 writes issue 13's target rows for one storage into the Targets table.
func targets13(w func(string, ...interface{}), s *storage) {
	f := s.fl.WithParent["prepare"]
	for _, op := range []string{"prepare", "view"} {
		if s.haveCSOff && s.haveFL {
			r := p50(s.csOff.ParentLatency[op]) / p50(f)
			w("| %s p50 on a parent, spares off, within 1.2x of the floor's Prepare | %.2fx (%s vs %s) | %s |", op, r, ms(s.csOff.ParentLatency[op].P50), ms(f.P50), yes(r <= 1.2))
		}
		if s.haveFL {
			if s.haveCSOn {
				r := p50(s.csOn.ParentLatency[op]) / p50(f)
				w("| %s p50 on a parent with a spare at most 0.25x the floor's Prepare | %.2fx (%s vs %s; %s) | %s |", op, r, ms(s.csOn.ParentLatency[op].P50), ms(f.P50), sparesCounts(s.csOn.ParentSpares), yes(r <= 0.25))
			} else {
				w("| %s p50 on a parent with a spare at most 0.25x the floor's Prepare | %s | – |", op, notRun(s))
			}
		}
	}
	if s.haveCSDM {
		d := p50(s.csDM.Start["start"])
		if s.haveCSOff {
			r := d / p50(s.csOff.Start["start"])
			w("| container start at least 5x faster than devmapper's (spares off) | %.2fx (%s vs %s) | %s |", r, ms(s.csOff.Start["start"].P50), ms(int64(d)), yes(r >= 5))
		}
		if s.haveCSOn {
			r := d / p50(s.csOn.Start["start"])
			w("| container start at least 5x faster than devmapper's (spares on) | %.2fx (%s vs %s) | %s |", r, ms(s.csOn.Start["start"].P50), ms(int64(d)), yes(r >= 5))
		} else {
			w("| container start at least 5x faster than devmapper's (spares on) | %s | – |", notRun(s))
		}
	}
	if s.haveST && s.st.ColdFirstMounts.N > 0 {
		if s.st.ColdAllS > 0 {
			w("| after a reboot, serving in under 1 s (target at 1,000 snapshots / 100 active; here %d / %d): reads (Stat, List) | %.3f s | %s |", s.st.Snapshots, s.st.ActiveDevices, s.st.ColdReadsS, yes(s.st.ColdReadsS < 1))
			w("| after a reboot, serving in under 1 s: every call (a store write waits for the pool and recovery) | %.3f s | %s |", s.st.ColdAllS, yes(s.st.ColdAllS < 1))
		} else {
			w("| after a reboot, serving in under 1 s (target at 1,000 snapshots / 100 active; here %d / %d) | %.3f s | %s |", s.st.Snapshots, s.st.ActiveDevices, s.st.ColdReadyS, yes(s.st.ColdReadyS < 1))
		}
		if a := s.floorActivate(); a.P50 > 0 {
			r := p50(s.st.ColdFirstMounts) / p50(a)
			w("| first Mounts of an inactive snapshot within 1.2x of one activation | %.2fx (%s vs %s) | %s |", r, ms(s.st.ColdFirstMounts.P50), ms(a.P50), yes(r <= 1.2))
		}
	}
	if m := s.ts.MemoryDetail["idle_after"]; len(m) > 0 {
		w("| idle RSS after the bench load under 20 MiB | %s (RssAnon %s, RssFile %s) | %s |", mib(m["vmrss_kb"]), mib(m["rss_anon_kb"]), mib(m["rss_file_kb"]), yes(m["vmrss_kb"] < 20*1024))
	}
}

// sideBySide is one table of the key figures with a column per storage.
func sideBySide(w func(string, ...interface{}), stors []*storage) {
	if len(stors) == 0 {
		return
	}
	w("## Side by side: tmpfs and disk")
	w("")
	w("Each ratio is computed within its storage (both terms measured on that storage in this run).")
	w("")
	hdr, sep := "| figure |", "|---|"
	for _, s := range stors {
		hdr += " " + s.name + " |"
		sep += "---|"
	}
	w("%s", hdr)
	w("%s", sep)
	row := func(name string, f func(s *storage) string) {
		line := "| " + name + " |"
		for _, s := range stors {
			line += " " + f(s) + " |"
		}
		w("%s", line)
	}
	row("floor Prepare p50 (with parent)", func(s *storage) string { return ms(s.fl.WithParent["prepare"].P50) })
	row("thinsnap Prepare p50 (with parent, (b)) / floor", func(s *storage) string {
		return ratio(p50(s.ts.Latency.WithParent["prepare"]), p50(s.fl.WithParent["prepare"]))
	})
	row("thinsnap fsyncs per Prepare (with parent)", func(s *storage) string {
		if fs := s.ts.Latency.WithParent["prepare"].FsyncsPerCall; fs != nil {
			return fmt.Sprintf("%.2f", *fs)
		}
		return "–"
	})
	row("devmapper / thinsnap Prepare p50 (with parent, (b))", func(s *storage) string {
		return ratio(p50(s.dm.Latency.WithParent["prepare"]), p50(s.ts.Latency.WithParent["prepare"]))
	})
	row("Prepare on a parent, spares off / floor", func(s *storage) string {
		return ratio(p50(s.csOff.ParentLatency["prepare"]), p50(s.fl.WithParent["prepare"]))
	})
	row("Prepare on a parent, spares on / floor (target <= 0.25x)", func(s *storage) string {
		if !s.haveCSOn {
			return notRun(s)
		}
		return ratio(p50(s.csOn.ParentLatency["prepare"]), p50(s.fl.WithParent["prepare"]))
	})
	row("container start p50: thinsnap spares off / on / devmapper", func(s *storage) string {
		on := notRun(s)
		if s.haveCSOn {
			on = ms(s.csOn.Start["start"].P50)
		}
		return ms(s.csOff.Start["start"].P50) + " / " + on + " / " + ms(s.csDM.Start["start"].P50)
	})
	row("container start, devmapper / thinsnap spares off (target >= 5x)", func(s *storage) string {
		return ratio(p50(s.csDM.Start["start"]), p50(s.csOff.Start["start"]))
	})
	row("container start, devmapper / thinsnap spares on (target >= 5x)", func(s *storage) string {
		if !s.haveCSOn {
			return notRun(s)
		}
		return ratio(p50(s.csDM.Start["start"]), p50(s.csOn.Start["start"]))
	})
	row("start-up: snapshots / active devices", func(s *storage) string {
		if !s.haveST {
			return "–"
		}
		return fmt.Sprintf("%d / %d", s.st.Snapshots, s.st.ActiveDevices)
	})
	row("warm restart ready (worst)", func(s *storage) string {
		if !s.haveST {
			return "–"
		}
		return fmt.Sprintf("%.3f s", maxf(s.st.WarmReadyS))
	})
	row("after a reboot: ready (target < 1 s)", func(s *storage) string {
		if !s.haveST {
			return "–"
		}
		if s.st.ColdAllS > 0 {
			return fmt.Sprintf("reads %.3f s, every call %.3f s", s.st.ColdReadsS, s.st.ColdAllS)
		}
		return fmt.Sprintf("%.3f s", s.st.ColdReadyS)
	})
	row("first Mounts of an inactive snapshot / one activation (target <= 1.2x)", func(s *storage) string {
		return ratio(p50(s.st.ColdFirstMounts), p50(s.floorActivate()))
	})
	row("idle after the load: VmRSS (RssAnon / RssFile)", func(s *storage) string {
		m := s.ts.MemoryDetail["idle_after"]
		if len(m) == 0 {
			return "–"
		}
		return fmt.Sprintf("%s (%s / %s)", mib(m["vmrss_kb"]), mib(m["rss_anon_kb"]), mib(m["rss_file_kb"]))
	})
	w("")
}

// ratioIf is ratio(a, b) when have, "not run" otherwise.
func ratioIf(have bool, a, b float64) string {
	if !have {
		return "not run"
	}
	return ratio(a, b)
}

// variants are the cstart runs of one storage, in the order of the tables.
func (s *storage) variants() []struct {
	name string
	r    cstartResult
	have bool
	sp   func(cstartResult) map[string]float64
} {
	on := "thinsnap, spares on"
	if s.haveCSOn {
		on = fmt.Sprintf("thinsnap, spares on (count %d)", s.csOn.Spares)
	}
	type v = struct {
		name string
		r    cstartResult
		have bool
		sp   func(cstartResult) map[string]float64
	}
	none := func(cstartResult) map[string]float64 { return nil }
	return []v{
		{"thinsnap, spares off", s.csOff, s.haveCSOff, none},
		{on, s.csOn, s.haveCSOn, nil},
		{"containerd devmapper", s.csDM, s.haveCSDM, none},
		{"containerd overlayfs", s.csOV, s.haveCSOV, none},
	}
}

// reportBurstUnpack writes (i) the burst and (j) the unpack of an image, when the run had them.
func reportBurstUnpack(w func(string, ...interface{}), s *storage) {
	vs := s.variants()
	anyBurst, anyUnpack := false, false
	for _, v := range vs {
		anyBurst = anyBurst || (v.have && v.r.Burst.N > 0)
		anyUnpack = anyUnpack || (v.have && v.r.Unpack.Layers > 0)
	}
	if anyBurst {
		b := vs[0].r.Burst
		for _, v := range vs {
			if v.have && v.r.Burst.N > 0 {
				b = v.r.Burst
				break
			}
		}
		w("## (i) A burst: %d Prepares at once on the image's top layer", b.N)
		w("")
		w("%d bursts of %d Prepares started together (one goroutine each) on the top layer of (g), in the same daemon or snapshotter right after (g); p50/p99 over every call of every burst, and the median wall time of a burst (first call's start to last call's end). With spares on, each burst starts once the wanted spares are ready (untimed), as after a quiet spell.", b.Rounds, b.N)
		w("")
		w("| variant | call p50 | call p99 | burst wall p50 | devmapper / this (p50) | this / overlayfs (p50) | spares |")
		w("|---|---|---|---|---|---|---|")
		dm, ov := p50(s.csDM.Burst.Prepare), p50(s.csOV.Burst.Prepare)
		for _, v := range vs {
			if !v.have || v.r.Burst.N == 0 {
				w("| %s | not run | | | | | |", v.name)
				continue
			}
			sp := v.r.BurstSpares
			if v.sp != nil {
				sp = v.sp(v.r)
			}
			x := v.r.Burst
			w("| %s | %s | %s | %s | %s | %s | %s |", v.name, ms(x.Prepare.P50), ms(x.Prepare.P99), ms(x.Wall.P50),
				ratioIf(s.haveCSDM, dm, p50(x.Prepare)), ratioIf(s.haveCSOV, p50(x.Prepare), ov), sparesCounts(sp))
		}
		w("")
	}
	if anyUnpack {
		u := vs[0].r.Unpack
		for _, v := range vs {
			if v.have && v.r.Unpack.Layers > 0 {
				u = v.r.Unpack
				break
			}
		}
		w("## (j) Unpack of an image of %d layers", u.Layers)
		w("")
		w("%d unpacks, each of a new image of %d layers (%.1f MiB of tar in all), as containerd's unpacker does it: per layer Stat, Prepare of `extract-<unique> <chain id>` on the layer below, mount, containerd's `archive.Apply`, unmount, Commit. The tars are in memory (a pull's fetch is the same for every snapshotter and left out), and no time passes between layers. With spares on, each unpack starts once the refiller has settled.", u.Rounds, u.Layers, float64(u.TarBytes)/(1<<20))
		w("")
		w("| variant | unpack p50 | unpack p99 | per layer: Prepare p50 | apply p50 | Commit p50 | devmapper / this (p50) | this / overlayfs (p50) | spares |")
		w("|---|---|---|---|---|---|---|---|---|")
		dm, ov := p50(s.csDM.Unpack.Unpack), p50(s.csOV.Unpack.Unpack)
		for _, v := range vs {
			if !v.have || v.r.Unpack.Layers == 0 {
				w("| %s | not run | | | | | | | |", v.name)
				continue
			}
			sp := v.r.UnpackSpares
			if v.sp != nil {
				sp = v.sp(v.r)
			}
			x := v.r.Unpack
			w("| %s | %s | %s | %s | %s | %s | %s | %s | %s |", v.name, ms(x.Unpack.P50), ms(x.Unpack.P99), ms(x.Prepare.P50), ms(x.Apply.P50), ms(x.Commit.P50),
				ratioIf(s.haveCSDM, dm, p50(x.Unpack)), ratioIf(s.haveCSOV, p50(x.Unpack), ov), sparesCounts(sp))
		}
		w("")
	}
}

// reportFloorUdev writes the floor's steps with udev's default rules against a private device's
// flags, when the floor ran both.
func reportFloorUdev(w func(string, ...interface{}), s *storage) {
	if !s.haveFL || len(s.fl.WithParentPrivate) == 0 {
		return
	}
	w("## (f') The floor with udev's rules and with a private device's flags")
	w("")
	w("The floor's series twice (udev running in the VM: %v): with `DmOptions::default()` (udev runs every rule for each new device, as for a disk: `blkid` probe, `by-uuid` links, inotify watch) and with `DmOptions::private()` (udev makes `/dev/mapper/NAME` and skips the disk, subsystem and other rules), which thinsnap's thin devices use. The resume and the remove wait for udev's rules to finish (the cookie).", s.fl.UdevRunning)
	w("")
	if s.haveFLNoUdev {
		w("")
		w("(f'') Last column: the same default series run again after udevd was stopped (phase `floor-noudev`): no ioctl waits for udev; what is left is the kernel's.")
	}
	w("")
	w("| step | case | default p50 | private p50 | default / private | udev stopped p50 |")
	w("|---|---|---|---|---|---|")
	for _, c := range []struct {
		name            string
		def, priv, noud map[string]Stats
	}{{"no parent", s.fl.NoParent, s.fl.NoParentPrivate, s.flNoUdev.NoParent}, {"with parent", s.fl.WithParent, s.fl.WithParentPrivate, s.flNoUdev.WithParent}} {
		for _, k := range []string{"prepare", "prepare.resume", "commit", "activate", "remove_active"} {
			d, p := c.def[k], c.priv[k]
			nu := "not run"
			if s.haveFLNoUdev {
				nu = ms(c.noud[k].P50)
			}
			w("| %s | %s | %s | %s | %s | %s |", k, c.name, ms(d.P50), ms(p.P50), ratio(p50(d), p50(p)), nu)
		}
	}
	w("")
}
