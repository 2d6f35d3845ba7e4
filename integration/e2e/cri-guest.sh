#!/bin/bash
# The CRI test in the VM: thinsnap started as deploy/thinsnap.service's ExecStart says, containerd
# with a deploy/ snippet, and integration/cri-test driving containerd's CRI socket.
#   cri-guest.sh main            CRI plugin on thinsnap (deploy/containerd-config*.toml)
#   cri-guest.sh runtime-class   default snapshotter overlayfs, runtime handler "thinsnap" on
#                                thinsnap (deploy/containerd-runtimeclass*.toml); containerd 1.7+
# Environment (set by matrix-guest.sh):
#   CRI_CONTAINERD_BIN   dir of containerd, ctr, containerd-shim-runc-v2 (default: PATH)
#   CRI_CONFIG_FORM      v2 | v3 (containerd 2.x)
#   CRI_IMAGE            image in the loopback registry (e.g. 127.0.0.1:5000/cri-small:latest)
#   CRI_HOSTS_DIR        containerd registry hosts dir (hosts.toml per registry: the loopback
#                        registry, and registry.k8s.io mirrored to it for the pause image)
#   CRI_TEST_BIN         the cri-test binary; THINSNAP_BIN, THINSNAP_UNIT (the unit to start it
#                        as; default deploy/thinsnap.service); RESULTS_DIR (logs)
# Prints PASS/FAIL lines and ends with "N passed, N failed" (its own setup checks + cri-test's).
{
set -uo pipefail
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
[[ -n ${CRI_CONTAINERD_BIN:-} ]] && export PATH=$CRI_CONTAINERD_BIN:$PATH
MODE=${1:?usage: cri-guest.sh main|runtime-class}
E2E=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
REPO=$(cd "$E2E/../.." && pwd -P)
BIN=${THINSNAP_BIN:-$REPO/target/debug/thinsnap}
CRI_TEST=${CRI_TEST_BIN:-$REPO/integration/cri-test/target/debug/cri-test}
FORM=${CRI_CONFIG_FORM:-v2}
RESULTS=${RESULTS_DIR:-${VM_RESULTS:-/tmp/cri-results}}
W=/tmp/cri-$MODE
POOL=thinsnap-cri
TROOT=$W/thinsnap/root
TCONF=$W/thinsnap/config.toml
TSOCK=$W/thinsnap/thinsnap.sock
CROOT=$W/containerd
CCONF=$W/containerd.toml
PY=/usr/bin/python3
mkdir -p "$RESULTS"

PASSED=0 FAILED=0 T0=$(date +%s)
pass() { PASSED=$((PASSED + 1)); echo "PASS: $*"; }
fail() { FAILED=$((FAILED + 1)); echo "FAIL: $1"; shift; (($#)) && printf '%s\n' "$@" | sed 's/^/      /'; }
TS_PID='' CD_PID=''
teardown() {
  [[ -n $CD_PID ]] && { kill -TERM "$CD_PID"; wait "$CD_PID"; } 2>/dev/null
  CD_PID=''
  # mounts of containers the test could not remove
  grep -o " $CROOT/[^ ]*" /proc/mounts | sort -r | xargs -r -n1 umount -l 2>/dev/null
  grep -o " $W/run[^ ]*" /proc/mounts | sort -r | xargs -r -n1 umount -l 2>/dev/null
  if [[ -n $TS_PID ]]; then
    kill -TERM "$TS_PID"
    wait "$TS_PID"
    local rc=$?
    ((rc == 0)) && pass "thinsnap exited 0 on SIGTERM" || fail "thinsnap exits 0 on SIGTERM (status $rc)"
    TS_PID=''
    if out=$(timeout 300 "$BIN" pool destroy --config "$TCONF" --remove-files 2>&1); then pass "thinsnap pool destroy --remove-files"; else
      fail "thinsnap pool destroy --remove-files" "$out"
    fi
  fi
  umount "$CROOT" 2>/dev/null
}
finish() {
  teardown
  echo
  echo "cri-guest $MODE ($(containerd --version | awk '{print $3}')): $(($(date +%s) - T0))s"
  echo "$PASSED passed, $FAILED failed"
  ((FAILED == 0))
  exit
}
abort() { fail "$@"; finish; }

case $FORM in
  v2) main_snippet=containerd-config.toml rc_snippet=containerd-runtimeclass.toml
    registry_table='plugins."io.containerd.grpc.v1.cri".registry' cni_table='plugins."io.containerd.grpc.v1.cri".cni' ;;
  v3) main_snippet=containerd-config-v3.toml rc_snippet=containerd-runtimeclass-v3.toml
    registry_table='plugins."io.containerd.cri.v1.images".registry' cni_table='plugins."io.containerd.cri.v1.runtime".cni' ;;
  *) abort "CRI_CONFIG_FORM is v2 or v3 (got $FORM)" ;;
esac
snippet=$main_snippet
[[ $MODE == runtime-class ]] && snippet=$rc_snippet
version=$(containerd --version | awk '{print $3}')
echo "cri-guest $MODE: containerd $version ($(command -v containerd)), deploy/$snippet, image $CRI_IMAGE"

rm -rf "$W"
mkdir -p "$W/thinsnap" "$CROOT"
# (a copy unless it is the package's: a `cargo build` on the host must not swap it under us)
[[ $BIN == /usr/bin/thinsnap ]] || { cp "$BIN" "$W/thinsnap.bin" && BIN=$W/thinsnap.bin; }
# containerd's root on ext4 (overlayfs needs it; and it is not the filesystem of thinsnap's root,
# so ImageFsInfo pointing there would be caught)
truncate -s 2G "$W/containerd.img"
mkfs.ext4 -q -F "$W/containerd.img" && mount -o loop "$W/containerd.img" "$CROOT" || abort "scratch ext4 for containerd's root"

cat >"$TCONF" <<EOF
root = "$TROOT"
address = "$TSOCK"
[pool]
name = "$POOL"
mode = "loop"
data_size = "4GiB"
metadata_size = "128MiB"
[fs]
type = "ext4"
base_size = "1GiB"
EOF
# THINSNAP_SPARES (set by matrix-guest.sh; default 0, off): [spares] count, written even when 0
# (thinsnap's own default is 8)
printf '[spares]\ncount = %s\n' "${THINSNAP_SPARES:-0}" >>"$TCONF"
if ((${THINSNAP_SPARES:-0} > 0)); then
  echo "thinsnap with warm spares: [spares] count = $THINSNAP_SPARES"
fi

# thinsnap, started as the unit's ExecStart says (binary and config path substituted)
mapfile -t unit < <($PY "$E2E/e2e.py" unit-exec "${THINSNAP_UNIT:-$REPO/deploy/thinsnap.service}" "$BIN" "$TCONF")
envs=() argv=()
for line in "${unit[@]}"; do
  case $line in env\ *) envs+=("${line#env }") ;; arg\ *) argv+=("${line#arg }") ;; esac
done
((${#argv[@]})) || abort "ExecStart of deploy/thinsnap.service"
[[ -n ${RUST_LOG:-} ]] && envs+=("RUST_LOG=$RUST_LOG")
(env "${envs[@]}" "${argv[@]}" >>"$RESULTS/thinsnap-cri-$MODE.log" 2>&1) &
TS_PID=$!
for _ in $(seq 600); do
  "$BIN" status --config "$TCONF" --json >/dev/null 2>&1 && break
  kill -0 "$TS_PID" 2>/dev/null || break
  sleep 0.5
done
"$BIN" status --config "$TCONF" --json >/dev/null 2>&1 && pass "thinsnap serving ($(($(date +%s) - T0))s)" ||
  abort "thinsnap serving" "$(tail -n 20 "$RESULTS/thinsnap-cri-$MODE.log")"

mkdir -p "$W/cni"
cat >"$W/cni/10-thinsnap-test.conflist" <<EOF
{
  "cniVersion": "1.0.0",
  "name": "thinsnap-test",
  "plugins": [
    {"type": "bridge", "bridge": "tstest0", "isGateway": true, "ipMasq": false,
     "ipam": {"type": "host-local", "dataDir": "$W/cni-ipam", "ranges": [[{"subnet": "10.88.0.0/16"}]]}}
  ]
}
EOF

# containerd: test-only top-level keys, the deploy/ snippet (socket and root substituted), test tables
{
  echo "root = \"$CROOT/root\""
  echo "state = \"$W/run/containerd\""
  bash "$E2E/deploy-snippet.sh" "$REPO/deploy/$snippet" "$TSOCK" "$TROOT" || exit 1
  echo "[$registry_table]"
  echo "  config_path = \"$CRI_HOSTS_DIR\""
  # pod networking for pods that are not host-network: a plain bridge from Debian's
  # containernetworking-plugins, which live in /usr/lib/cni (Debian's containerd 1.6.20 looks in
  # /opt/cni/bin unless told; 2.x's bin_dirs default has both)
  echo "[$cni_table]"
  echo "  conf_dir = \"$W/cni\""
  [[ $FORM == v2 ]] && echo "  bin_dir = \"/usr/lib/cni\""
  echo "[grpc]"
  echo "  address = \"$CROOT/containerd.sock\""
} >"$CCONF" || abort "containerd config from deploy/$snippet"
cp "$CCONF" "$RESULTS/containerd-cri-$MODE.toml"

# ImageFsInfo: containerd 1.6.32+ / 1.7.16+ / 2.x report the snippet's exports.root; older ones
# ignore it and report <containerd root>/io.containerd.snapshotter.v1.thinsnap, which
# deploy/README.md tells operators to make a symlink to thinsnap's root. Do what it says.
old_exports=no
if [[ $version =~ ^1\.6\.([0-9]+) ]] && ((BASH_REMATCH[1] < 32)); then old_exports=yes; fi
if [[ $version =~ ^1\.7\.([0-9]+) ]] && ((BASH_REMATCH[1] < 16)); then old_exports=yes; fi
if [[ $old_exports == yes ]]; then
  mkdir -p "$CROOT/root"
  ln -s "$TROOT" "$CROOT/root/io.containerd.snapshotter.v1.thinsnap"
  echo "containerd $version ignores exports.root: symlinked $CROOT/root/io.containerd.snapshotter.v1.thinsnap -> $TROOT (deploy/README.md)"
fi

containerd --config "$CCONF" >>"$RESULTS/containerd-cri-$MODE.log" 2>&1 &
CD_PID=$!
export CONTAINERD_ADDRESS=$CROOT/containerd.sock
for _ in $(seq 240); do
  ctr version >/dev/null 2>&1 && break
  kill -0 "$CD_PID" 2>/dev/null || break
  sleep 0.5
done
ctr version >/dev/null 2>&1 && pass "containerd $version serving with deploy/$snippet" ||
  abort "containerd $version starts with deploy/$snippet" "$(tail -n 20 "$RESULTS/containerd-cri-$MODE.log")"
ctr plugins ls | grep -E '^io\.containerd\.snapshotter\.v1[[:space:]]+thinsnap[[:space:]].*ok' >/dev/null &&
  pass "ctr plugins ls: thinsnap ok" || fail "ctr plugins ls: thinsnap ok" "$(ctr plugins ls 2>&1 | grep -i -e thinsnap -e cri)"
if ! ctr plugins ls 2>/dev/null | grep -E 'io\.containerd\.grpc\.v1[[:space:]]+cri[[:space:]].*ok' >/dev/null; then
  abort "ctr plugins ls: the CRI plugin is ok" "$(ctr plugins ls 2>&1 | grep -i cri)" "$(grep -i 'error' "$RESULTS/containerd-cri-$MODE.log" | tail -n 10)"
fi
pass "ctr plugins ls: the CRI plugin is ok"

args=(--endpoint "$CROOT/containerd.sock" --image "$CRI_IMAGE" --thinsnap-bin "$BIN" --thinsnap-config "$TCONF" --pool "$POOL")
if [[ $MODE == main ]]; then
  args+=(--imagefs-dev-of "$TROOT")
else
  args+=(--handler thinsnap)
fi
echo "cri-test $MODE ${args[*]}"
timeout 1200 "$CRI_TEST" "$MODE" "${args[@]}" | tee "$W/cri-test.out"
rc=${PIPESTATUS[0]}
read -r p f < <(sed -n 's/^\([0-9]*\) passed, \([0-9]*\) failed$/\1 \2/p' "$W/cri-test.out" | tail -n1)
PASSED=$((PASSED + ${p:-0})) FAILED=$((FAILED + ${f:-0}))
((rc != 0 && ${f:-0} == 0)) && fail "cri-test $MODE exited $rc"
if [[ $old_exports == yes ]]; then
  # deploy/README.md says containerd leaves that symlink alone: after a whole CRI run it must still be there
  [[ -L $CROOT/root/io.containerd.snapshotter.v1.thinsnap && $(readlink "$CROOT/root/io.containerd.snapshotter.v1.thinsnap") == "$TROOT" ]] &&
    pass "containerd $version left the symlink $CROOT/root/io.containerd.snapshotter.v1.thinsnap alone" ||
    fail "containerd $version left the symlink alone" "$(ls -la "$CROOT/root/" 2>&1)"
fi
finish
}
