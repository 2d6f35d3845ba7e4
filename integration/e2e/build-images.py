#!/usr/bin/env python3
"""Builds the e2e test image (no registry, no network) and the listing it must produce.

    build-images.py [OUT_DIR]          (default: <repo>/integration/.results/e2e-images; run as root)
    build-images.py --check [OUT_DIR]  exit 0 if OUT_DIR is complete and built from the current inputs

Writes into OUT_DIR:
  layers.oci.tar   OCI image archive for `ctr images import --base-name localhost/e2e-layers`
                   (one image, tag "latest", 6 layers written by hand, see LAYERS below)
  oci/             the same image as an OCI layout (umoci reads it)
  rootfs/          the image's root filesystem as `umoci unpack` applies the layers: an applier
                   independent of containerd, used as the reference
  expected.list    list.sh's output over rootfs/: what every container must see
  meta.json        names, digests, diff ids, chain ids (containerd's snapshot names) per layer
  small-oci/       a small two-layer image for the CRI tests (busybox + /etc/passwd; /data/top)
  pause-oci/       the test's own pod sandbox image: one layer with a static /pause (pause.c)
  stamp            hash of the inputs; a second run with the same inputs does nothing

The layers are written by hand with tarfile rather than by umoci, so the exact entry order is under
control: a directory replaced by a file is the whiteout `.wh.NAME` followed by the file (umoci
itself would write the file then a whiteout below it, which containerd rejects), and the image
carries whiteouts, an opaque directory, hard links, symlinks, user.* xattrs, a 48 MiB file and
files owned by non-root uids.

The OUT_DIR filesystem must support user.* xattrs (ext4 or xfs, not a 6.1 tmpfs).
"""
import gzip
import hashlib
import io
import json
import os
import random
import shutil
import subprocess
import sys
import tarfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
MTIME = 1700000000
BIG_SIZE = 48 << 20
ZERO_SIZE = 16 << 20
IMAGE_NAME = "e2e-layers"


class Layer:
    def __init__(self, comment, gzip_it=True):
        self.comment = comment
        self.gzip = gzip_it
        self.buf = io.BytesIO()
        self.tar = tarfile.open(fileobj=self.buf, mode="w", format=tarfile.PAX_FORMAT)

    def _add(self, ti, data=None, xattrs=None):
        ti.mtime = MTIME
        ti.uname = ti.gname = ""
        if xattrs:
            ti.pax_headers = {"SCHILY.xattr." + k: v for k, v in xattrs.items()}
        self.tar.addfile(ti, io.BytesIO(data) if data is not None else None)

    def dir(self, path, mode=0o755, uid=0, gid=0, xattrs=None):
        ti = tarfile.TarInfo(path.rstrip("/") + "/")
        ti.type, ti.mode, ti.uid, ti.gid = tarfile.DIRTYPE, mode, uid, gid
        self._add(ti, xattrs=xattrs)

    def file(self, path, data, mode=0o644, uid=0, gid=0, xattrs=None):
        if isinstance(data, str):
            data = data.encode()
        ti = tarfile.TarInfo(path)
        ti.type, ti.mode, ti.uid, ti.gid, ti.size = tarfile.REGTYPE, mode, uid, gid, len(data)
        self._add(ti, data, xattrs)

    def symlink(self, path, target, uid=0, gid=0):
        ti = tarfile.TarInfo(path)
        ti.type, ti.linkname, ti.mode, ti.uid, ti.gid = tarfile.SYMTYPE, target, 0o777, uid, gid
        self._add(ti)

    def hardlink(self, path, target):
        ti = tarfile.TarInfo(path)
        ti.type, ti.linkname, ti.mode = tarfile.LNKTYPE, target, 0o644
        self._add(ti)

    def whiteout(self, path):
        d, name = os.path.split(path)
        self.file(os.path.join(d, ".wh." + name), b"", mode=0o600)

    def opaque(self, dirpath):
        self.file(os.path.join(dirpath, ".wh..wh..opq"), b"", mode=0o600)

    def finish(self):
        self.tar.close()
        raw = self.buf.getvalue()
        diff_id = "sha256:" + hashlib.sha256(raw).hexdigest()
        if self.gzip:
            out = io.BytesIO()
            with gzip.GzipFile(fileobj=out, mode="wb", compresslevel=1, mtime=0) as g:
                g.write(raw)
            blob = out.getvalue()
            media = "application/vnd.oci.image.layer.v1.tar+gzip"
        else:
            blob = raw
            media = "application/vnd.oci.image.layer.v1.tar"
        return blob, media, diff_id


def build_layers(busybox, xattrs_bin):
    layers = []

    # 1: busybox, the xattr helper, a passwd, and the directories later layers change
    l1 = Layer("base: busybox, xattrs helper, /data skeleton")
    l1.dir("bin")
    l1.file("bin/busybox", busybox, mode=0o755)
    l1.file("bin/xattrs", xattrs_bin, mode=0o755)
    l1.symlink("bin/sh", "busybox")
    l1.dir("etc")
    l1.file("etc/passwd", "root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000::/home/user:/bin/sh\n"
            "nobody:x:65534:65534::/nonexistent:/bin/false\n")
    l1.file("etc/group", "root:x:0:\nuser:x:1000:\nnogroup:x:65534:\n")
    l1.dir("data")
    l1.file("data/keep", "keep v1\n")
    l1.file("data/modme", "modme v1\n")
    l1.file("data/deleteme", "deleted by layer 3\n")
    l1.dir("data/deldir")
    l1.file("data/deldir/a", "a\n")
    l1.file("data/deldir/b", "b\n")
    l1.dir("data/opaque")
    l1.file("data/opaque/old1", "hidden by the opaque whiteout\n")
    l1.dir("data/opaque/oldsub")
    l1.file("data/opaque/oldsub/old2", "hidden too\n")
    l1.dir("data/dir-to-file")
    l1.file("data/dir-to-file/child", "child of a directory that becomes a file\n")
    l1.dir("data/dir-to-file/sub")
    l1.file("data/dir-to-file/sub/deep", "deep\n")
    l1.file("data/file-to-dir", "a file that becomes a directory\n")
    l1.file("data/name with space", "spaces\n")
    l1.file("data/empty", b"")
    layers.append(l1)

    # 2: big files
    l2 = Layer("big files")
    l2.dir("data")
    l2.file("data/big.bin", random.Random(20240601).randbytes(BIG_SIZE))
    l2.file("data/zeros.bin", bytes(ZERO_SIZE))
    layers.append(l2)

    # 3 (uncompressed): whiteouts, opaque dir, hard links, symlinks, a modified file
    l3 = Layer("whiteouts, opaque directory, hard links, symlinks", gzip_it=False)
    l3.dir("data")
    l3.whiteout("data/deleteme")
    l3.whiteout("data/deldir")
    l3.dir("data/opaque")
    l3.opaque("data/opaque")
    l3.file("data/opaque/new", "only file left in the opaque dir\n")
    l3.dir("data/links")
    l3.file("data/links/hard-a", "three names, one inode\n")
    l3.hardlink("data/links/hard-b", "data/links/hard-a")
    l3.hardlink("data/links/hard-c", "data/links/hard-a")
    l3.symlink("data/links/rel", "../keep")
    l3.symlink("data/links/abs", "/data/big.bin")
    l3.symlink("data/links/dangling", "/nonexistent/target")
    l3.symlink("data/links/dir-link", "../opaque")
    l3.file("data/modme", "modme v3\n")
    layers.append(l3)

    # 4: a directory replaced by a file and a file by a directory (whiteout first), xattrs
    l4 = Layer("dir->file, file->dir, xattrs")
    l4.dir("data")
    l4.whiteout("data/dir-to-file")
    l4.file("data/dir-to-file", "now a regular file\n", mode=0o640)
    l4.whiteout("data/file-to-dir")
    l4.dir("data/file-to-dir", mode=0o750)
    l4.file("data/file-to-dir/inner", "inside the new directory\n")
    l4.file("data/xattr-file", "has xattrs\n",
            xattrs={"user.thinsnap.test": "hello world", "user.utf8": "h\u00e9llo \u2713"})
    l4.dir("data/xattr-dir", xattrs={"user.dir": "on a directory"})
    l4.file("data/xattr-dir/plain", "no xattr here\n")
    layers.append(l4)

    # 5: ownership and special modes
    l5 = Layer("non-root owners, setuid, sticky")
    l5.dir("data")
    l5.dir("data/owned", mode=0o750, uid=1000, gid=1000)
    l5.file("data/owned/user-file", "owned by 1000\n", mode=0o640, uid=1000, gid=1000)
    l5.file("data/owned/nobody-file", "owned by nobody\n", mode=0o600, uid=65534, gid=65534)
    l5.file("data/owned/high-id", "owned by 100000:200000\n", uid=100000, gid=200000)
    l5.symlink("data/owned/user-link", "user-file", uid=1000, gid=1000)
    l5.file("data/setuid", "setuid root\n", mode=0o4755)
    l5.dir("data/sticky", mode=0o1777)
    l5.file("data/modme", "modme v5\n", uid=1000, gid=1000)
    layers.append(l5)

    # 6: delete a big file of layer 2, a metadata-only change, one more file
    l6 = Layer("delete zeros.bin, chmod keep")
    l6.dir("data")
    l6.whiteout("data/zeros.bin")
    l6.file("data/keep", "keep v1\n", mode=0o600)
    l6.file("data/last", "layer 6\n")
    layers.append(l6)
    return layers


def put_blob(oci, data):
    digest = hashlib.sha256(data).hexdigest()
    with open(os.path.join(oci, "blobs", "sha256", digest), "wb") as f:
        f.write(data)
    return "sha256:" + digest


def chain_ids(diff_ids):
    out = []
    for d in diff_ids:
        out.append(d if not out else "sha256:" + hashlib.sha256(f"{out[-1]} {d}".encode()).hexdigest())
    return out


def write_oci(oci, layer_blobs, tag, history, image_config=None):
    """layer_blobs: list of (blob bytes, media type, diff id). Returns the manifest digest."""
    shutil.rmtree(oci, ignore_errors=True)
    os.makedirs(os.path.join(oci, "blobs", "sha256"))
    descs = []
    for blob, media, _ in layer_blobs:
        descs.append({"mediaType": media, "digest": put_blob(oci, blob), "size": len(blob)})
    config = {
        "created": "2023-11-14T22:13:20Z",
        "architecture": "amd64",
        "os": "linux",
        "config": image_config or {"Env": ["PATH=/bin"], "Cmd": ["/bin/sh"], "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": [d for _, _, d in layer_blobs]},
        "history": [{"created": "2023-11-14T22:13:20Z", "created_by": h} for h in history],
    }
    cfg = json.dumps(config, sort_keys=True).encode()
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": put_blob(oci, cfg), "size": len(cfg)},
        "layers": descs,
    }
    man = json.dumps(manifest, sort_keys=True).encode()
    man_digest = put_blob(oci, man)
    index = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                       "digest": man_digest, "size": len(man),
                       "platform": {"architecture": "amd64", "os": "linux"},
                       "annotations": {"org.opencontainers.image.ref.name": tag}}],
    }
    with open(os.path.join(oci, "index.json"), "w") as f:
        json.dump(index, f, sort_keys=True)
    with open(os.path.join(oci, "oci-layout"), "w") as f:
        json.dump({"imageLayoutVersion": "1.0.0"}, f)
    return man_digest


def tar_dir(src, dst):
    """An OCI archive: the layout's files at the root of an uncompressed tar."""
    with tarfile.open(dst, "w", format=tarfile.PAX_FORMAT) as t:
        for name in sorted(os.listdir(src)):
            t.add(os.path.join(src, name), arcname=name)


def sanity_check_rootfs(r):
    """The reference applier (umoci) must have produced what the layers mean, or the reference is
    worthless: check the intent of every layer directly."""
    def p(x):
        return os.path.join(r, x)
    problems = []

    def want(cond, what):
        if not cond:
            problems.append(what)
    want(not os.path.lexists(p("data/deleteme")), "whiteout: data/deleteme still there")
    want(not os.path.lexists(p("data/deldir")), "whiteout: data/deldir still there")
    want(sorted(os.listdir(p("data/opaque"))) == ["new"], "opaque: data/opaque is not just 'new'")
    want(os.path.isfile(p("data/dir-to-file")) and not os.path.islink(p("data/dir-to-file")),
         "dir->file: data/dir-to-file is not a file")
    want(os.path.isdir(p("data/file-to-dir")), "file->dir: data/file-to-dir is not a directory")
    a, b, c = (os.lstat(p(f"data/links/hard-{x}")) for x in "abc")
    want(a.st_ino == b.st_ino == c.st_ino and a.st_nlink == 3, "hard links: not one inode with 3 links")
    want(os.readlink(p("data/links/rel")) == "../keep", "symlink: data/links/rel")
    want(os.getxattr(p("data/xattr-file"), "user.thinsnap.test") == b"hello world", "xattr on data/xattr-file")
    want(os.getxattr(p("data/xattr-dir"), "user.dir") == b"on a directory", "xattr on data/xattr-dir")
    st = os.lstat(p("data/owned/user-file"))
    want((st.st_uid, st.st_gid) == (1000, 1000), "owner of data/owned/user-file")
    st = os.lstat(p("data/owned/high-id"))
    want((st.st_uid, st.st_gid) == (100000, 200000), "owner of data/owned/high-id")
    want(os.lstat(p("data/setuid")).st_mode & 0o7777 == 0o4755, "mode of data/setuid")
    want(os.lstat(p("data/sticky")).st_mode & 0o7777 == 0o1777, "mode of data/sticky")
    want(os.path.getsize(p("data/big.bin")) == BIG_SIZE, "size of data/big.bin")
    want(not os.path.lexists(p("data/zeros.bin")), "whiteout: data/zeros.bin still there")
    want(open(p("data/modme")).read() == "modme v5\n", "content of data/modme")
    want(os.lstat(p("data/keep")).st_mode & 0o7777 == 0o600, "mode of data/keep")
    if problems:
        sys.exit("build-images: umoci's rootfs does not match the layers' intent:\n  " + "\n  ".join(problems))


def input_stamp(busybox_path):
    h = hashlib.sha256()
    for f in (__file__, os.path.join(HERE, "xattrs.c"), os.path.join(HERE, "pause.c"),
              os.path.join(HERE, "list.sh"), busybox_path):
        with open(f, "rb") as fh:
            h.update(fh.read())
    return h.hexdigest()


def up_to_date(out, stamp):
    stamp_file = os.path.join(out, "stamp")
    return os.path.exists(stamp_file) and open(stamp_file).read().strip() == stamp \
        and all(os.path.exists(os.path.join(out, f)) for f in ("expected.list", "layers.oci.tar", "meta.json",
                                                                 "small-oci/index.json", "pause-oci/index.json"))


def main():
    args = sys.argv[1:]
    check_only = bool(args) and args[0] == "--check"
    if check_only:
        args = args[1:]
    out = os.path.abspath(args[0] if args else os.path.join(REPO, "integration/.results/e2e-images"))
    busybox_path = shutil.which("busybox") or "/bin/busybox"
    stamp = input_stamp(busybox_path)
    if check_only:
        sys.exit(0 if up_to_date(out, stamp) else 1)
    os.makedirs(out, exist_ok=True)
    stamp_file = os.path.join(out, "stamp")
    if up_to_date(out, stamp):
        print(f"build-images: {out} is up to date")
        return
    if os.path.exists(stamp_file):
        os.unlink(stamp_file)

    # the xattr helper, static so that it runs in a busybox-only image
    xattrs_bin = os.path.join(out, "xattrs")
    subprocess.run(["cc", "-static", "-O2", "-s", "-o", xattrs_bin, os.path.join(HERE, "xattrs.c")], check=True)
    with open(busybox_path, "rb") as f:
        busybox = f.read()
    with open(xattrs_bin, "rb") as f:
        xattrs = f.read()

    layers = build_layers(busybox, xattrs)
    blobs = [l.finish() for l in layers]
    oci = os.path.join(out, "oci")
    man_digest = write_oci(oci, blobs, "latest", [l.comment for l in layers])
    tar_dir(oci, os.path.join(out, "layers.oci.tar.tmp"))
    os.replace(os.path.join(out, "layers.oci.tar.tmp"), os.path.join(out, "layers.oci.tar"))

    # the reference rootfs, applied by umoci
    bundle = os.path.join(out, "bundle")
    shutil.rmtree(bundle, ignore_errors=True)
    subprocess.run(["umoci", "unpack", "--image", oci + ":latest", bundle], check=True,
                   stdout=subprocess.DEVNULL)
    rootfs = os.path.join(out, "rootfs")
    shutil.rmtree(rootfs, ignore_errors=True)
    os.rename(os.path.join(bundle, "rootfs"), rootfs)
    shutil.rmtree(bundle)
    sanity_check_rootfs(rootfs)

    env = dict(os.environ, BB=busybox_path)
    listing = subprocess.run([busybox_path, "sh", os.path.join(HERE, "list.sh"), rootfs], env=env,
                             check=True, stdout=subprocess.PIPE).stdout
    with open(os.path.join(out, "expected.list"), "wb") as f:
        f.write(listing)

    diff_ids = [d for _, _, d in blobs]
    meta = {
        "image": IMAGE_NAME,
        "tag": "latest",
        "manifest": man_digest,
        "layers": [{"comment": l.comment, "mediaType": m, "digest": "sha256:" + hashlib.sha256(b).hexdigest(),
                    "size": len(b), "diff_id": d} for l, (b, m, d) in zip(layers, blobs)],
        "diff_ids": diff_ids,
        "chain_ids": chain_ids(diff_ids),
        "big_file": {"path": "/data/big.bin", "size": BIG_SIZE, "layer": 2},
    }
    with open(os.path.join(out, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1, sort_keys=True)

    # the CRI tests' small image and the pause image
    s1 = Layer("small: busybox, /etc/passwd")
    s1.dir("bin")
    s1.file("bin/busybox", busybox, mode=0o755)
    s1.symlink("bin/sh", "busybox")
    s1.dir("etc")
    s1.file("etc/passwd", "root:x:0:0:root:/root:/bin/sh\n")
    s2 = Layer("small: /data/top")
    s2.dir("data")
    s2.file("data/top", "top layer\n")
    write_oci(os.path.join(out, "small-oci"), [s1.finish(), s2.finish()], "latest", [s1.comment, s2.comment])
    pause_bin = os.path.join(out, "pause")
    subprocess.run(["cc", "-static", "-O2", "-s", "-o", pause_bin, os.path.join(HERE, "pause.c")], check=True)
    pl = Layer("pause")
    with open(pause_bin, "rb") as f:
        pl.file("pause", f.read(), mode=0o755)
    write_oci(os.path.join(out, "pause-oci"), [pl.finish()], "latest", [pl.comment],
              image_config={"Entrypoint": ["/pause"], "WorkingDir": "/"})

    with open(stamp_file, "w") as f:
        f.write(stamp + "\n")
    n = listing.count(b"\n")
    print(f"build-images: {out}: image {IMAGE_NAME}:latest, {len(layers)} layers, "
          f"{os.path.getsize(os.path.join(out, 'layers.oci.tar')) >> 20} MiB archive, {n} reference lines")


if __name__ == "__main__":
    main()
