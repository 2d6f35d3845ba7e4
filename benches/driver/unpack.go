package main

// The unpack of a multi-layer image (benches/README.md, (j)), done as containerd's unpacker does
// it for every snapshotter: per layer, Stat of the layer's chain id, Prepare of an
// "extract-<unique> <chain id>" key on the previous layer labelled containerd.io/snapshot.ref,
// mount, apply the layer's tar (containerd's own archive.Apply), unmount, Commit as the chain id.
// The layers' tars are made in memory before the timing: the fetch of a pull costs the same
// whatever the snapshotter, so what is timed is the snapshotter's share of a pull.

import (
	"archive/tar"
	"bytes"
	"context"
	"flag"
	"fmt"
	"math/rand"
	"time"

	"github.com/containerd/containerd/archive"
	"github.com/containerd/containerd/mount"
	"github.com/containerd/containerd/snapshots"
)

var (
	upLayers = flag.Int("unpack-layers", 6, "cstart: layers of the image unpacked in (j) (0: no unpack)")
	upRounds = flag.Int("unpacks", 3, "cstart: unpacks timed, each of a new image (what one made is removed, untimed, before the next)")
	upKiB    = flag.Int("unpack-kib", 8192, "cstart: bytes of files in the first layer, in KiB; each later layer has half the one before (at least 256 KiB)")
)

// The label containerd's unpacker puts on an unpack's Prepare and Commit (snapshots.TargetSnapshotLabel).
const targetSnapshotLabel = "containerd.io/snapshot.ref"

// layerTars makes n layer tars: layer l holds a directory of 16 KiB files of pseudo-random bytes
// (the same for every snapshotter: a fixed seed), `first` KiB in the first layer, half the one
// before in each later one.
func layerTars(n, firstKiB int) [][]byte {
	rng := rand.New(rand.NewSource(25))
	var tars [][]byte
	kib := firstKiB
	for l := 0; l < n; l++ {
		var buf bytes.Buffer
		tw := tar.NewWriter(&buf)
		dir := fmt.Sprintf("usr/lib/layer%d/", l)
		must(tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: dir, Mode: 0755, ModTime: time.Unix(0, 0)}), "tar dir")
		for f := 0; f < kib/16; f++ {
			body := make([]byte, 16<<10)
			rng.Read(body)
			must(tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: fmt.Sprintf("%sf%04d", dir, f), Mode: 0644,
				Size: int64(len(body)), ModTime: time.Unix(0, 0)}), "tar header")
			_, err := tw.Write(body)
			must(err, "tar body")
		}
		must(tw.Close(), "tar close")
		tars = append(tars, buf.Bytes())
		if kib /= 2; kib < 256 {
			kib = 256
		}
	}
	return tars
}

// unpackOnce unpacks `tars` as a new image named by tag; returns the committed chain ids (base
// first) and the time of the whole unpack and of each layer's Prepare, apply (mount, archive.Apply,
// unmount) and Commit.
func unpackOnce(ctx context.Context, sn snapshots.Snapshotter, tag string, tars [][]byte,
	prep, apply, commit *[]time.Duration) ([]string, time.Duration) {
	parent := ""
	var chain []string
	t0 := time.Now()
	for l, tb := range tars {
		chainID := fmt.Sprintf("%s-chain-%d", tag, l)
		if _, err := sn.Stat(ctx, chainID); err == nil {
			must(fmt.Errorf("already unpacked"), "unpack %s", chainID)
		}
		key := fmt.Sprintf("extract-%d-%d %s", time.Now().UnixNano(), l, chainID)
		labels := snapshots.WithLabels(map[string]string{targetSnapshotLabel: chainID})
		a := time.Now()
		mounts, err := sn.Prepare(ctx, key, parent, labels)
		b := time.Now()
		must(err, "unpack prepare %s", key)
		must(mount.WithTempMount(ctx, mounts, func(root string) error {
			_, err := archive.Apply(ctx, root, bytes.NewReader(tb))
			return err
		}), "unpack apply %s", key)
		c := time.Now()
		must(sn.Commit(ctx, chainID, key, labels), "unpack commit %s", key)
		d := time.Now()
		*prep, *apply, *commit = append(*prep, b.Sub(a)), append(*apply, c.Sub(b)), append(*commit, d.Sub(c))
		chain = append(chain, chainID)
		parent = chainID
	}
	return chain, time.Since(t0)
}

// unpacks times `rounds` unpacks of an image of `layers` layers, each of a new image (new chain
// ids, the same tars). Before each, settle() (untimed) lets a snapshotter's background work end,
// as after a quiet spell on a node; what an unpack made is removed, untimed, after it.
func unpacks(ctx context.Context, sn snapshots.Snapshotter, tag string, layers, rounds, firstKiB int, settle func()) map[string]interface{} {
	tars := layerTars(layers, firstKiB)
	var bytesTotal int
	for _, t := range tars {
		bytesTotal += len(t)
	}
	var total, prep, apply, commit []time.Duration
	for r := 0; r < rounds; r++ {
		settle()
		chain, d := unpackOnce(ctx, sn, fmt.Sprintf("%s-%d", tag, r), tars, &prep, &apply, &commit)
		total = append(total, d)
		logf("unpack %d/%d of %d layers (%d bytes of tar): %s", r+1, rounds, layers, bytesTotal, d)
		removeAll(ctx, sn, chain)
	}
	return map[string]interface{}{"layers": layers, "rounds": rounds, "tar_bytes": bytesTotal,
		"unpack": summarize(total), "prepare": summarize(prep), "apply": summarize(apply), "commit": summarize(commit)}
}
