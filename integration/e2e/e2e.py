#!/usr/bin/env python3
"""Helpers for run-guest.sh (stdlib only; runs in the guest with Debian's python3).

  e2e.py unit-exec UNIT BIN CONFIG
      Reads the systemd unit and prints how to start thinsnap exactly as systemd would, with only
      the binary and the config path substituted: lines "env NAME=VALUE" (Environment=),
      "caps cap_a,cap_b" (CapabilityBoundingSet=), "nnp yes|no" (NoNewPrivileges=), "type T"
      (Type=), then "arg X" per argv element of ExecStart. Exits 1 if ExecStart does not name
      /usr/bin/thinsnap and /etc/thinsnap/config.toml.
  e2e.py notify-listen SOCKET LOG
      A systemd-style NOTIFY_SOCKET: binds a datagram socket and appends every message to LOG.
  e2e.py add-layer SRC_OCI TAG LAYER MEDIA_TYPE OUT_OCI
      A new OCI layout OUT_OCI: SRC_OCI's image (tag "latest") plus one layer on top, tagged TAG.
  e2e.py tree-check TREE_FILE CHAIN_IDS...
      Checks `ctr snapshots tree` output: the chain ids nest in order, each one level deeper.
"""
import gzip
import hashlib
import json
import os
import shlex
import shutil
import socket
import sys


def unit_exec(unit, binary, config):
    props = {}
    section = None
    with open(unit) as f:
        lines = f.read().replace("\\\n", " ").splitlines()
    for line in lines:
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        if section != "Service" or "=" not in line:
            continue
        k, v = line.split("=", 1)
        props.setdefault(k.strip(), []).append(v.strip())
    execs = props.get("ExecStart", [])
    if len(execs) != 1:
        sys.exit(f"unit-exec: want exactly one ExecStart=, found {len(execs)}")
    argv = shlex.split(execs[0].lstrip("-@:+!"))
    if argv[0] != "/usr/bin/thinsnap":
        sys.exit(f"unit-exec: ExecStart runs {argv[0]!r}, not /usr/bin/thinsnap")
    if argv.count("/etc/thinsnap/config.toml") != 1:
        sys.exit("unit-exec: ExecStart does not pass /etc/thinsnap/config.toml")
    argv[0] = binary
    argv[argv.index("/etc/thinsnap/config.toml")] = config
    for env in props.get("Environment", []):
        for assignment in shlex.split(env):
            print("env " + assignment)
    caps = " ".join(props.get("CapabilityBoundingSet", [])).split()
    if caps:
        print("caps " + ",".join(c.lower().removeprefix("cap_") for c in caps))
    print("nnp " + ("yes" if props.get("NoNewPrivileges", ["no"])[-1] in ("yes", "true", "1", "on") else "no"))
    print("type " + props.get("Type", ["simple"])[-1])
    for a in argv:
        print("arg " + a)


def notify_listen(path, log):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    with open(log, "a") as out:
        while True:
            msg = s.recv(65536).decode(errors="replace")
            for line in msg.splitlines():
                out.write(line + "\n")
            out.flush()


def add_layer(src, tag, layer, media, out):
    def blob(oci, digest):
        return os.path.join(oci, "blobs", "sha256", digest.split(":", 1)[1])

    def put(data):
        d = "sha256:" + hashlib.sha256(data).hexdigest()
        with open(blob(out, d), "wb") as f:
            f.write(data)
        return d

    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(src, out)
    with open(os.path.join(src, "index.json")) as f:
        index = json.load(f)
    desc = index["manifests"][0]
    with open(blob(src, desc["digest"])) as f:
        manifest = json.load(f)
    with open(blob(src, manifest["config"]["digest"])) as f:
        config = json.load(f)
    with open(layer, "rb") as f:
        data = f.read()
    raw = gzip.decompress(data) if media.endswith("+gzip") else data
    config["rootfs"]["diff_ids"].append("sha256:" + hashlib.sha256(raw).hexdigest())
    config["history"].append({"created_by": "e2e: committed container writes"})
    cfg = json.dumps(config, sort_keys=True).encode()
    manifest["config"] = {"mediaType": manifest["config"]["mediaType"], "digest": put(cfg), "size": len(cfg)}
    manifest["layers"].append({"mediaType": media, "digest": put(data), "size": len(data)})
    man = json.dumps(manifest, sort_keys=True).encode()
    desc = dict(desc, digest=put(man), size=len(man), annotations={"org.opencontainers.image.ref.name": tag})
    index["manifests"] = [desc]
    with open(os.path.join(out, "index.json"), "w") as f:
        json.dump(index, f, sort_keys=True)


def tree_check(tree_file, chain):
    depth = {}
    with open(tree_file) as f:
        for line in f:
            if line.strip():
                # "<2 spaces per level>\\_ NAME" (level 0: " NAME")
                depth[line.split()[-1]] = len(line) - len(line.lstrip())
    problems = []
    for i, c in enumerate(chain):
        if c not in depth:
            problems.append(f"{c} missing")
        elif i and chain[i - 1] in depth and depth[c] <= depth[chain[i - 1]]:
            problems.append(f"{c} not below {chain[i - 1]}")
    if problems:
        sys.exit("tree-check: " + "; ".join(problems))


def main():
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "unit-exec":
        unit_exec(*args)
    elif cmd == "notify-listen":
        notify_listen(*args)
    elif cmd == "add-layer":
        add_layer(*args)
    elif cmd == "tree-check":
        tree_check(args[0], args[1:])
    else:
        sys.exit(f"unknown command {cmd}")


if __name__ == "__main__":
    main()
