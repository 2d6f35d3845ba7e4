#!/bin/bash
# End-to-end test: containerd 1.6 + runc run containers on thinsnap, on a real dm-thin pool.
# Runs as root INSIDE the VM:   integration/vm.sh integration/e2e/run-guest.sh
# (or integration/e2e/run.sh on the host, which builds the test image first).
#
# Environment:
#   THINSNAP_BIN    thinsnap binary (default <repo>/target/debug/thinsnap)
#   RESULTS_DIR     writable dir for logs (default $VM_RESULTS, set by vm.sh)
#   E2E_IMAGES      output of build-images.py (default <repo>/integration/.results/e2e-images;
#                   built here on a scratch ext4 if missing or stale)
#   E2E_SNAPSHOTTER thinsnap (default) | overlayfs: the same container checks on containerd's
#                   built-in overlayfs, to tell the test's own bugs from thinsnap's
#   E2E_CONTAINERD_BIN  directory holding the containerd, ctr and containerd-shim-runc-v2 to test
#                   (default: the ones in PATH, Debian 12's 1.6.20); see integration/e2e/matrix-guest.sh
#   E2E_CONTAINERD_CONFIG  the deploy/ snippet to run containerd with: containerd-config.toml
#                   (default; version 2, containerd 1.6/1.7) or containerd-config-v3.toml (2.x)
#   E2E_PULL        an image reference in a registry (e.g. 127.0.0.1:5000/e2e-layers:latest holding
#                   the test image): the image comes by `ctr images pull --plain-http` (on 2.x
#                   through the transfer service) instead of `ctr images import`
#   THINSNAP_UNIT   the systemd unit to start thinsnap as (default deploy/thinsnap.service; the
#                   matrix passes the one the Debian package installed)
#   E2E_SCENARIO    full (default) | short: short leaves out the thinsnap and containerd restarts
#                   and the commit/diff/view steps (the matrix runs older containerds short)
#
# Prints PASS/FAIL per check and ends with "N passed, N failed"; exits 1 on any failure.
# The whole script is one brace group, so bash parses all of it before running any: editing this
# file while a run is in progress cannot derail that run (bash otherwise reads as it goes).
{
set -uo pipefail
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

E2E=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
REPO=$(cd "$E2E/../.." && pwd -P)
BIN=${THINSNAP_BIN:-$REPO/target/debug/thinsnap}
SNAP=${E2E_SNAPSHOTTER:-thinsnap}
IMAGES=${E2E_IMAGES:-$REPO/integration/.results/e2e-images}
RESULTS=${RESULTS_DIR:-${VM_RESULTS:-}}
W=/tmp/e2e
POOL=thinsnap-e2e
TCONF=$W/thinsnap/config.toml
TSOCK=$W/thinsnap/thinsnap.sock
CCONF=$W/containerd.toml
CROOT=$W/containerd
IMG=${E2E_PULL:-localhost/e2e-layers:latest}
IMG2=localhost/e2e-committed:latest
SCENARIO=${E2E_SCENARIO:-full}
# the unit whose ExecStart= starts thinsnap: the installed package's (matrix-guest.sh sets it) or deploy/'s
UNIT=${THINSNAP_UNIT:-$REPO/deploy/thinsnap.service}
CD_CONFIG=${E2E_CONTAINERD_CONFIG:-containerd-config.toml}
if [[ -n ${E2E_CONTAINERD_BIN:-} ]]; then
  export PATH=$E2E_CONTAINERD_BIN:$PATH
fi
PY=/usr/bin/python3
[[ -x $PY ]] || PY=python3

if [[ -z $RESULTS ]]; then
  RESULTS=$(mktemp -d /tmp/e2e-results.XXXXXX)
  echo "note: no RESULTS_DIR/VM_RESULTS given; logs go to $RESULTS (lost with the guest)"
fi
mkdir -p "$RESULTS" || exit 1
exec > >(tee -a "$RESULTS/e2e.log") 2>&1

PASSED=0 FAILED=0
T0=$(date +%s)
pass() { PASSED=$((PASSED + 1)); echo "PASS: $*"; }
fail() {
  FAILED=$((FAILED + 1))
  echo "FAIL: $1"
  shift
  if (($#)); then printf '%s\n' "$@" | sed 's/^/      /'; fi
}
# check NAME CMD...: PASS if CMD exits 0, else FAIL with the tail of its output
check() {
  local name=$1 out
  shift
  if out=$("$@" 2>&1); then pass "$name"; else fail "$name" "$(tail -n 25 <<<"$out")"; fi
}
step() { printf '\n==== %s  (+%ss)\n' "$*" "$(($(date +%s) - T0))"; }
finish() {
  local rc=0
  ((FAILED)) && rc=1
  echo
  echo "e2e ($SNAP): $(($(date +%s) - T0))s in the guest; logs in $RESULTS"
  echo "$PASSED passed, $FAILED failed"
  exit "$rc"
}
abort() {
  fail "$*" "(aborting: later checks depend on this one)"
  teardown
  finish
}
strip_ansi() { sed 's/\x1b\[[0-9;]*m//g'; }
T() { timeout "${E2E_CMD_TIMEOUT:-900}" "$@"; }
ctr_() { T ctr "$@"; }
snaps() { ctr_ snapshots --snapshotter "$SNAP" "$@"; }

export CONTAINERD_ADDRESS=$CROOT/containerd.sock CONTAINERD_NAMESPACE=e2e

# ---------------------------------------------------------------- processes
TS_PID='' NOTIFY_PID='' CD_PID=''

start_thinsnap() { # LABEL
  local label=$1 line envs=() argv=() caps='' nnp=no
  while IFS= read -r line; do
    case $line in
      env\ *) envs+=("${line#env }") ;;
      caps\ *) caps=${line#caps } ;;
      nnp\ *) nnp=${line#nnp } ;;
      arg\ *) argv+=("${line#arg }") ;;
    esac
  done < <($PY "$E2E/e2e.py" unit-exec "$UNIT" "$BIN" "$TCONF")
  ((${#argv[@]})) || abort "parse ExecStart of deploy/thinsnap.service"
  # What systemd would add: the unit's capability bounding set and no_new_privs.
  local wrap=()
  if command -v setpriv >/dev/null; then
    [[ -n $caps ]] && wrap+=(--bounding-set "-all,+${caps//,/,+}")
    [[ $nnp == yes ]] && wrap+=(--no-new-privs)
    ((${#wrap[@]})) && wrap=(setpriv "${wrap[@]}" --)
  fi
  [[ -n ${RUST_LOG:-} ]] && envs+=("RUST_LOG=$RUST_LOG") # the caller's log level wins
  echo "thinsnap ($label): env ${envs[*]}; ${wrap[*]} ${argv[*]}"
  echo "==== thinsnap start ($label) $(date -u +%T)" >>"$RESULTS/thinsnap.log"
  : >"$W/notify.log"
  rm -f "$W/notify.sock"
  $PY "$E2E/e2e.py" notify-listen "$W/notify.sock" "$W/notify.log" &
  NOTIFY_PID=$!
  for _ in $(seq 100); do [[ -S $W/notify.sock ]] && break; sleep 0.1; done
  (env "${envs[@]}" NOTIFY_SOCKET="$W/notify.sock" "${wrap[@]}" "${argv[@]}" >>"$RESULTS/thinsnap.log" 2>&1) &
  TS_PID=$!
  local t0=$SECONDS
  while ((SECONDS - t0 < ${E2E_START_TIMEOUT:-400})); do
    grep -qx 'READY=1' "$W/notify.log" && break
    kill -0 "$TS_PID" 2>/dev/null || break
    sleep 0.5
  done
  if grep -qx 'READY=1' "$W/notify.log"; then
    pass "thinsnap ($label) sent READY=1 after $((SECONDS - t0))s (Type=notify)"
  else
    kill -0 "$TS_PID" 2>/dev/null && echo "thinsnap still running, no READY=1" || echo "thinsnap exited"
    abort "thinsnap ($label) ready; log tail:$(printf '\n%s' "$(tail -n 20 "$RESULTS/thinsnap.log" | strip_ansi)")"
  fi
  check "thinsnap ($label) socket $TSOCK accepts connections" \
    $PY -c 'import socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])' "$TSOCK"
}

stop_thinsnap() { # LABEL
  local label=$1 rc t0=$SECONDS
  [[ -n $TS_PID ]] || return 0
  kill -TERM "$TS_PID"
  while kill -0 "$TS_PID" 2>/dev/null && ((SECONDS - t0 < 120)); do sleep 0.2; done
  if kill -0 "$TS_PID" 2>/dev/null; then
    fail "thinsnap ($label) stops within 120s of SIGTERM"
    kill -KILL "$TS_PID"
  fi
  wait "$TS_PID"
  rc=$?
  if ((rc == 0)); then pass "thinsnap ($label) exited 0 on SIGTERM after $((SECONDS - t0))s"; else
    fail "thinsnap ($label) exits 0 on SIGTERM (exit status $rc)" "$(tail -n 15 "$RESULTS/thinsnap.log" | strip_ansi)"
  fi
  TS_PID=''
  kill "$NOTIFY_PID" 2>/dev/null
  wait "$NOTIFY_PID" 2>/dev/null
  NOTIFY_PID=''
}

start_containerd() { # LABEL
  echo "==== containerd start ($1) $(date -u +%T)" >>"$RESULTS/containerd.log"
  containerd --config "$CCONF" >>"$RESULTS/containerd.log" 2>&1 &
  CD_PID=$!
  local t0=$SECONDS
  while ((SECONDS - t0 < 120)); do
    ctr version >/dev/null 2>&1 && break
    kill -0 "$CD_PID" 2>/dev/null || break
    sleep 0.5
  done
  if ctr version >/dev/null 2>&1; then pass "containerd ($1) serving after $((SECONDS - t0))s"; else
    abort "containerd ($1) starts; log tail:$(printf '\n%s' "$(tail -n 20 "$RESULTS/containerd.log")")"
  fi
}

stop_containerd() { # LABEL
  local t0=$SECONDS
  [[ -n $CD_PID ]] || return 0
  kill -TERM "$CD_PID"
  while kill -0 "$CD_PID" 2>/dev/null && ((SECONDS - t0 < 60)); do sleep 0.2; done
  kill -0 "$CD_PID" 2>/dev/null && kill -KILL "$CD_PID"
  wait "$CD_PID" 2>/dev/null
  CD_PID=''
  pass "containerd ($1) stopped"
}

teardown() {
  [[ -n $CD_PID ]] && { kill -TERM "$CD_PID"; wait "$CD_PID"; } 2>/dev/null
  [[ -n $TS_PID ]] && { kill -TERM "$TS_PID"; wait "$TS_PID"; } 2>/dev/null
  [[ -n $NOTIFY_PID ]] && kill "$NOTIFY_PID" 2>/dev/null
  CD_PID='' TS_PID='' NOTIFY_PID=''
  if [[ $SNAP == thinsnap ]]; then
    dmsetup ls >"$RESULTS/dmsetup-ls.final" 2>&1
    dmsetup table >>"$RESULTS/dmsetup-ls.final" 2>&1
  fi
}

# ---------------------------------------------------------------- views
# thinsnap's view (status --json, dm devices) against containerd's (ctr snapshots ls/info/usage/tree)
ts_status() { T "$BIN" status --config "$TCONF" --json; }
# Warm spares' devices (THINSNAP_SPARES > 0): thinsnap's own, no snapshot's; left out of the device
# lists below (read after the list: a spare's record exists from before its device is made until
# after it is deleted). Empty with spares off.
spare_devs() {
  ((${THINSNAP_SPARES:-0} > 0)) || return 0
  ts_status 2>/dev/null | jq -r --arg p "$POOL-snap-" '.spares.thin_ids[]? | "\($p)\(.)"' | sort
}
no_spares() { if ((${THINSNAP_SPARES:-0} > 0)); then grep -vxF -f <(spare_devs; echo "-none-"); else cat; fi; }
dm_snaps() { dmsetup ls 2>/dev/null | awk -v p="$POOL-snap-" 'index($1, p) == 1 {print $1}' | sort | no_spares; }
mapper_snaps() { (cd /dev/mapper && ls -1 -- "$POOL"-snap-* 2>/dev/null) | sort | no_spares; }
ls_counts() { # FILE -> "active view committed"
  awk 'NR > 1 {k[$NF]++} END {printf "%d %d %d\n", k["Active"], k["View"], k["Committed"]}' "$1"
}

# compare_views: one attempt; prints the mismatches, exit 0 when everything agrees
compare_views() {
  local bad=() a v c sa sv sc ids ndm nmap
  snaps ls >"$W/ls.txt" 2>&1 || { echo "ctr snapshots ls failed: $(cat "$W/ls.txt")"; return 1; }
  read -r a v c < <(ls_counts "$W/ls.txt")
  if [[ $SNAP == thinsnap ]]; then
    ts_status >"$W/status.json" 2>&1 || { echo "thinsnap status failed (exit $?): $(cat "$W/status.json")"; return 1; }
    read -r sa sv sc ids < <(jq -r '"\(.snapshots.active) \(.snapshots.view) \(.snapshots.committed) \(.thin_ids_in_use)"' "$W/status.json")
    [[ "$a $v $c" == "$sa $sv $sc" ]] || bad+=("ctr ls active/view/committed = $a/$v/$c, thinsnap status = $sa/$sv/$sc")
    ((ids == a + v + c + 1)) || bad+=("thinsnap thin_ids_in_use = $ids, want snapshots + base = $((a + v + c + 1))")
    ndm=$(dm_snaps | wc -l)
    nmap=$(mapper_snaps | wc -l)
    ((ndm == a + v)) || bad+=("dm devices $POOL-snap-* (dmsetup ls) = $ndm, want active + view = $((a + v)): $(dm_snaps | tr '\n' ' ')")
    [[ "$(dm_snaps)" == "$(mapper_snaps)" ]] || bad+=("/dev/mapper ($nmap: $(mapper_snaps | tr '\n' ' ')) differs from dmsetup ls ($(dm_snaps | tr '\n' ' '))")
  fi
  ((${#bad[@]})) && printf '%s\n' "${bad[@]}" && return 1
  echo "agree: $a active, $v view, $c committed"
}

# check_views LABEL [full]: counts always (retried a while: containerd removes backend snapshots in
# its GC, asynchronously); with "full" also info, usage and tree (slow under emulation)
check_views() {
  local label=$1 depth=${2:-light} out t0=$SECONDS
  gc_sync
  until out=$(compare_views); do
    ((SECONDS - t0 > 60)) && break
    sleep 2
  done
  if compare_views >/dev/null 2>&1; then pass "views agree ($label): $out"; else
    fail "views agree ($label)" "$out" "ctr snapshots ls:" "$(cat "$W/ls.txt")"
    [[ $SNAP == thinsnap ]] && echo "      status: $(jq -c '{snapshots, thin_ids_in_use}' "$W/status.json" 2>/dev/null)"
  fi
  [[ $depth == full ]] || return 0
  # info agrees with ls, key by key
  local key parent kind info bad=()
  while read -r key parent kind; do
    [[ -z $kind ]] && kind=$parent parent=''
    info=$(snaps info "$key" 2>&1) || { bad+=("info $key: $info"); continue; }
    [[ $(jq -r '.Kind' <<<"$info") == "$kind" && $(jq -r '.Parent // ""' <<<"$info") == "$parent" ]] ||
      bad+=("info $key: $(jq -c '{Kind, Parent}' <<<"$info"), ls: $kind parent '$parent'")
  done < <(awk 'NR > 1' "$W/ls.txt")
  if ((${#bad[@]})); then fail "ctr snapshots info agrees with ls ($label)" "${bad[@]}"; else
    pass "ctr snapshots info agrees with ls for $(($(wc -l <"$W/ls.txt") - 1)) snapshots ($label)"
  fi
  # usage: every snapshot has one; the big-file layer's own usage covers the 48 MiB file
  if snaps usage -b >"$W/usage.txt" 2>&1; then
    local n_ls n_use
    n_ls=$(($(wc -l <"$W/ls.txt") - 1))
    n_use=$(($(wc -l <"$W/usage.txt") - 1))
    ((n_ls == n_use)) && pass "ctr snapshots usage answers for all $n_use snapshots ($label)" ||
      fail "ctr snapshots usage answers for all snapshots ($label): $n_use of $n_ls" "$(cat "$W/usage.txt")"
    if grep -q "^${CHAIN[1]} " "$W/usage.txt"; then
      local u1 u2
      u1=$(awk -v k="${CHAIN[0]}" '$1 == k {print $2}' "$W/usage.txt")
      u2=$(awk -v k="${CHAIN[1]}" '$1 == k {print $2}' "$W/usage.txt")
      if ((u2 >= BIG_SIZE && u1 < BIG_SIZE)); then
        pass "usage is per layer ($label): layer 1 $((u1 >> 20)) MiB, layer 2 (48 MiB file) $((u2 >> 20)) MiB"
      else
        fail "usage is per layer ($label): want layer 2 >= $BIG_SIZE and layer 1 < $BIG_SIZE bytes, got $u2 and $u1"
      fi
    fi
  else
    fail "ctr snapshots usage ($label)" "$(cat "$W/usage.txt")"
  fi
  # tree: the image's chain nests in order
  if grep -q "^${CHAIN[0]} " "$W/ls.txt"; then
    if snaps tree >"$W/tree.txt" 2>&1; then
      check "ctr snapshots tree nests the image's ${#CHAIN[@]} layers in order ($label)" \
        $PY "$E2E/e2e.py" tree-check "$W/tree.txt" "${CHAIN[@]}"
    else
      fail "ctr snapshots tree ($label)" "$(cat "$W/tree.txt")"
    fi
  fi
}

# a synchronous garbage collection: deleting a lease with --sync waits for one
gc_sync() {
  local id=e2e-gc-$RANDOM
  ctr_ leases create --id "$id" >/dev/null 2>&1 && ctr_ leases rm --sync "$id" >/dev/null 2>&1
}

# ---------------------------------------------------------------- listings
LIST_SCRIPT=$(cat "$E2E/list.sh")
C1_WRITES='
BB=/bin/busybox
$BB echo c1 >/data/c1-wrote && $BB chown 1000:1000 /data/c1-wrote
$BB ln /data/c1-wrote /data/c1-hard
$BB rm /data/keep /data/links/hard-c
$BB echo appended >>/data/modme
$BB mkdir -p /data/c1dir/sub && $BB ln -s ../../c1-wrote /data/c1dir/sub/link
$BB rm -r /data/opaque
$BB rm -r /data/file-to-dir && $BB echo file again >/data/file-to-dir
$BB chmod 700 /data/sticky
$BB dd if=/dev/urandom of=/data/c1-random bs=1M count=8 2>/dev/null
$BB sync
'

compare_listing() { # NAME GOT_FILE WANT_FILE
  if cmp -s "$2" "$3"; then pass "$1 ($(wc -l <"$3") lines identical)"; else
    fail "$1" "$(diff -u "$3" "$2" | head -n 40)"
  fi
}

# ================================================================ setup
step "setup ($SNAP), results in $RESULTS"
if [[ -r $REPO/integration/guest/lib.sh && -n ${VM_RESULTS:-} && -n ${GUEST_REPO:-} ]]; then
  # shellcheck disable=SC1091
  . "$REPO/integration/guest/lib.sh" && guest_prelude
fi
modprobe loop 2>/dev/null
modprobe dm-thin-pool 2>/dev/null
grep -q '^cgroup2 /sys/fs/cgroup ' /proc/mounts || mount -t cgroup2 cgroup2 /sys/fs/cgroup
for tool in containerd ctr runc containerd-shim-runc-v2 dmsetup losetup mkfs.ext4 jq "$PY"; do
  command -v "$tool" >/dev/null || abort "tool $tool present in the guest"
done
CD_VERSION=$(containerd --version | awk '{print $3}')
echo "containerd $CD_VERSION ($(command -v containerd)), config deploy/$CD_CONFIG, scenario $SCENARIO, image ${E2E_PULL:-imported}"
[[ -f $REPO/deploy/$CD_CONFIG ]] || abort "deploy/$CD_CONFIG exists"
[[ $SNAP == thinsnap || $SNAP == overlayfs ]] || abort "E2E_SNAPSHOTTER is thinsnap or overlayfs (got $SNAP)"
if [[ $SNAP == thinsnap ]]; then
  [[ -x $BIN ]] || abort "thinsnap binary at $BIN (build it, or set THINSNAP_BIN)"
  grep -qw device-mapper /proc/misc || abort "device-mapper in the kernel (run in the VM)"
fi
rm -rf "$W"
mkdir -p "$W/thinsnap" "$CROOT"
if [[ $SNAP == thinsnap && $BIN == /usr/bin/thinsnap ]]; then
  echo "thinsnap binary: $BIN, installed by the Debian package in the guest"
elif [[ $SNAP == thinsnap ]]; then
  # A private copy: a `cargo build` on the host during the run must not swap the binary under us.
  cp "$BIN" "$W/thinsnap.bin" || abort "copy $BIN into the guest"
  echo "thinsnap binary: $BIN ($(stat -c '%s bytes, modified %y' "$BIN")), run from a copy"
  BIN=$W/thinsnap.bin
fi

# containerd's root on ext4: overlayfs (E2E_SNAPSHOTTER=overlayfs) needs user xattrs, which the
# guest's tmpfs does not have
truncate -s 3G "$W/containerd.img"
mkfs.ext4 -q -F "$W/containerd.img" && mount -o loop "$W/containerd.img" "$CROOT" ||
  abort "scratch ext4 for containerd's root"

# the test image: built on the host by build-images.py, or here if missing or stale
if ! $PY "$E2E/build-images.py" --check "$IMAGES" >/dev/null 2>&1; then
  echo "test image in $IMAGES missing or stale: building it in the guest (slow under emulation)"
  IMAGES=$W/images
  mkdir -p "$IMAGES"
  truncate -s 1G "$W/images.img"
  mkfs.ext4 -q -F "$W/images.img" && mount -o loop "$W/images.img" "$IMAGES" || abort "scratch ext4 for the image build"
  T $PY "$E2E/build-images.py" "$IMAGES" || abort "build the test image in the guest"
fi
mapfile -t CHAIN < <(jq -r '.chain_ids[]' "$IMAGES/meta.json")
BIG_SIZE=$(jq -r '.big_file.size' "$IMAGES/meta.json")
pass "test image ready: ${#CHAIN[@]} layers, reference listing of $(wc -l <"$IMAGES/expected.list") lines"

# thinsnap's test config: the unit's ExecStart runs with it instead of /etc/thinsnap/config.toml
cat >"$TCONF" <<EOF
root = "$W/thinsnap/root"
address = "$TSOCK"

[pool]
name = "$POOL"
mode = "loop"
data_size = "4GiB"
metadata_size = "128MiB"
block_size = "64KiB"

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

# containerd's config: test-only top-level keys, deploy/$CD_CONFIG with only thinsnap's socket
# and root replaced by the test's (integration/e2e/deploy-snippet.sh), then test-only tables (TOML
# wants top-level keys before the first table)
{
  echo "# generated by integration/e2e/run-guest.sh"
  echo "root = \"$CROOT/root\""
  echo "state = \"$CROOT/state\""
  echo
  echo "# ---- deploy/$CD_CONFIG, socket and root substituted ----"
  bash "$E2E/deploy-snippet.sh" "$REPO/deploy/$CD_CONFIG" "$TSOCK" "$W/thinsnap/root" || abort "deploy/$CD_CONFIG substituted"
  echo "# ---- end of deploy/$CD_CONFIG ----"
  echo
  echo "[grpc]"
  echo "  address = \"$CROOT/containerd.sock\""
  echo "[debug]"
  echo "  level = \"info\""
} >"$CCONF"
cp "$CCONF" "$TCONF" "$RESULTS/" 2>/dev/null

# ================================================================ daemons
if [[ $SNAP == thinsnap ]]; then
  step "thinsnap, started as deploy/thinsnap.service's ExecStart"
  start_thinsnap first
  if ts_status >"$W/status0.json" 2>&1; then
    pass "thinsnap status --json answers: $(jq -c '{pool_name, snapshots, thin_ids_in_use, base_thin_id}' "$W/status0.json")"
    [[ $(jq -r '.snapshots.active + .snapshots.view + .snapshots.committed' "$W/status0.json") == 0 &&
      $(jq -r '.thin_ids_in_use' "$W/status0.json") == 1 ]] &&
      pass "fresh pool: no snapshots, one thin id in use (the base)" ||
      fail "fresh pool: no snapshots, one thin id in use (the base)" "$(cat "$W/status0.json")"
  else
    fail "thinsnap status --json" "$(cat "$W/status0.json")"
  fi
  # Only this pool's devices: other tests run beside this one in the VM (all.sh's lanes).
  dmsetup ls | awk -v p="$POOL" 'index($1, p) == 1 {print $1}' | sort | no_spares >"$W/dm-baseline.txt"
  echo "dm devices with no snapshot: $(tr '\n' ' ' <"$W/dm-baseline.txt")"
  grep -qx "$POOL" "$W/dm-baseline.txt" && pass "pool device $POOL exists" || fail "pool device $POOL exists"
fi

step "containerd $CD_VERSION with deploy/$CD_CONFIG"
start_containerd first
ctr_ plugins ls >"$W/plugins.txt" 2>&1
if [[ $SNAP == thinsnap ]]; then
  grep -E '^io\.containerd\.snapshotter\.v1[[:space:]]+thinsnap[[:space:]].*[[:space:]]ok[[:space:]]*$' "$W/plugins.txt" >/dev/null &&
    pass "ctr plugins ls: snapshotter thinsnap ok" || fail "ctr plugins ls: snapshotter thinsnap ok" "$(grep -i thinsnap "$W/plugins.txt")"
  # 1.x logs the CRI config at start; 2.x does not (its CRI test checks pods' root devices)
  if [[ $CD_VERSION == 1.* ]]; then
    grep -q 'Start cri plugin with config.*Snapshotter:thinsnap' "$RESULTS/containerd.log" &&
      pass "the CRI plugin runs with snapshotter thinsnap (containerd log)" ||
      fail "the CRI plugin runs with snapshotter thinsnap (containerd log)" "$(grep -i 'cri' "$RESULTS/containerd.log" | tail -n 5)"
  fi
fi

# ================================================================ import
if [[ -n ${E2E_PULL:-} ]]; then
  step "pull the $((${#CHAIN[@]}))-layer image from the registry into $SNAP"
  if out=$(ctr_ images pull --plain-http --snapshotter "$SNAP" "$IMG" 2>&1); then
    pass "ctr images pull --plain-http --snapshotter $SNAP $IMG (and unpack)"
  else
    abort "ctr images pull --plain-http --snapshotter $SNAP $IMG: $out"
  fi
  echo "$out" | tail -n 12
  out=$(ctr_ images check 2>&1)
  grep -q "^$IMG .*complete" <<<"$out" && pass "ctr images check: $IMG complete" || fail "ctr images check: $IMG complete" "$out"
else
  step "import the $((${#CHAIN[@]}))-layer image into $SNAP"
  if out=$(ctr_ images import --snapshotter "$SNAP" --base-name localhost/e2e-layers "$IMAGES/layers.oci.tar" 2>&1); then
    pass "ctr images import --snapshotter $SNAP (and unpack)"
  else
    abort "ctr images import --snapshotter $SNAP: $out"
  fi
fi
echo "$out"
ctr_ images ls | grep -q "^$IMG " && pass "image $IMG listed" || fail "image $IMG listed" "$(ctr images ls)"
missing=()
for c in "${CHAIN[@]}"; do grep -q "^$c " <(snaps ls) || missing+=("$c"); done
((${#missing[@]} == 0)) && pass "one committed snapshot per layer, named by chain id" ||
  fail "one committed snapshot per layer, named by chain id" "missing: ${missing[*]}" "$(snaps ls)"
check_views "after import" full

# ================================================================ containers
step "container 1 sees exactly the image, then writes"
C1_SCRIPT="( $LIST_SCRIPT
)
echo =====WRITES=====
$C1_WRITES
echo =====AFTER=====
( $LIST_SCRIPT
)"
ctr_ run --snapshotter "$SNAP" "$IMG" e2e-c1 /bin/sh -c "$C1_SCRIPT" list / >"$W/c1.out" 2>&1
rc=$?
cp "$W/c1.out" "$RESULTS/c1.out"
((rc == 0)) && pass "ctr run --snapshotter $SNAP: container 1 ran" || fail "ctr run --snapshotter $SNAP: container 1 exits 0 (status $rc)" "$(tail -n 20 "$W/c1.out")"
awk '/^=====WRITES=====$/ {exit} {print}' "$W/c1.out" >"$W/c1-before.list"
awk 'f {print} /^=====AFTER=====$/ {f = 1}' "$W/c1.out" >"$W/c1-after.list"
compare_listing "container 1 sees the layers exactly as umoci applies them" "$W/c1-before.list" "$IMAGES/expected.list"
want=('^/data/c1-wrote|file|644|1000:1000|' '^hardlinks: /data/c1-hard /data/c1-wrote$'
  '^hardlinks: /data/links/hard-a /data/links/hard-b$' '^/data/file-to-dir|file|' '^/data/sticky|dir|700|0:0$'
  '^/data/c1-random|file|644|0:0|size=8388608|' '^/data/c1dir/sub/link|symlink|.*-> ../../c1-wrote$')
bad=()
for re in "${want[@]}"; do grep -q -- "$re" "$W/c1-after.list" || bad+=("missing: $re"); done
grep -q -e '^/data/keep|' -e '^/data/opaque' "$W/c1-after.list" && bad+=("/data/keep or /data/opaque still there")
((${#bad[@]} == 0)) && pass "container 1's writes show in its own listing" || fail "container 1's writes show in its own listing" "${bad[@]}"
check_views "container 1 exited, its snapshot still active"

step "container 2 from the same image does not see container 1's writes"
ctr_ run --rm --snapshotter "$SNAP" "$IMG" e2e-c2 /bin/sh -c "$LIST_SCRIPT" list / >"$W/c2.list" 2>&1
compare_listing "container 2 sees the pristine image" "$W/c2.list" "$IMAGES/expected.list"
check_views "container 2 removed"

if [[ $SCENARIO == full ]]; then
step "restart thinsnap while a container runs"
ctr_ run -d --snapshotter "$SNAP" "$IMG" e2e-long /bin/sh -c 'echo started >/data/long; exec /bin/busybox sleep 100000' >/dev/null 2>&1
for _ in $(seq 120); do
  [[ $(ctr_ task exec --exec-id probe-$RANDOM e2e-long /bin/busybox cat /data/long 2>/dev/null) == started ]] && break
  sleep 1
done
[[ $(ctr_ task exec --exec-id probe e2e-long /bin/busybox cat /data/long 2>&1) == started ]] &&
  pass "long-running container up (ctr run -d)" || fail "long-running container up (ctr run -d)" "$(ctr task ls 2>&1)"
snaps ls | sort >"$W/ls-before-restart.txt"
dm_snaps >"$W/dm-before-restart.txt"
if [[ $SNAP == thinsnap ]]; then
  stop_thinsnap "restart 1"
  out=$(ctr_ task exec --exec-id during e2e-long /bin/busybox sh -c 'echo during >>/data/long && /bin/busybox cat /data/long' 2>&1)
  [[ $out == $'started\nduring' ]] && pass "the container reads and writes its rootfs while thinsnap is down" ||
    fail "the container reads and writes its rootfs while thinsnap is down" "$out"
  start_thinsnap "restart 1"
  dm_snaps >"$W/dm-after-restart.txt"
  cmp -s "$W/dm-before-restart.txt" "$W/dm-after-restart.txt" &&
    pass "thin devices unchanged across the restart ($(wc -l <"$W/dm-after-restart.txt") active)" ||
    fail "thin devices unchanged across the restart" "$(diff "$W/dm-before-restart.txt" "$W/dm-after-restart.txt")"
  snaps ls | sort >"$W/ls-after-restart.txt"
  cmp -s "$W/ls-before-restart.txt" "$W/ls-after-restart.txt" && pass "ctr snapshots ls unchanged across the thinsnap restart" ||
    fail "ctr snapshots ls unchanged across the thinsnap restart" "$(diff "$W/ls-before-restart.txt" "$W/ls-after-restart.txt")"
  check_views "after the thinsnap restart" full
fi
out=$(ctr_ task exec --exec-id after e2e-long /bin/busybox sh -c 'echo after >>/data/long && /bin/busybox cat /data/long' 2>&1)
[[ $out == *started*after ]] && pass "the running container's rootfs is intact and writable afterwards" ||
  fail "the running container's rootfs is intact and writable afterwards" "$out"
ctr_ task kill -s SIGKILL e2e-long >/dev/null 2>&1
for _ in $(seq 60); do ctr_ task ls 2>/dev/null | grep -q '^e2e-long .*RUNNING' || break; sleep 1; done
check "long-running container killed and removed" sh -c 'ctr task rm -f e2e-long && ctr containers rm e2e-long'
# a new container after the restart gets a fresh snapshot that works
ctr_ run --rm --snapshotter "$SNAP" "$IMG" e2e-c2b /bin/sh -c "$LIST_SCRIPT" list / >"$W/c2b.list" 2>&1
compare_listing "a new container after the thinsnap restart sees the pristine image" "$W/c2b.list" "$IMAGES/expected.list"

step "restart containerd"
snaps ls | sort >"$W/ls-before-crestart.txt"
stop_containerd "restart"
start_containerd "restart"
snaps ls | sort >"$W/ls-after-crestart.txt"
cmp -s "$W/ls-before-crestart.txt" "$W/ls-after-crestart.txt" && pass "ctr snapshots ls unchanged across the containerd restart" ||
  fail "ctr snapshots ls unchanged across the containerd restart" "$(diff "$W/ls-before-crestart.txt" "$W/ls-after-crestart.txt")"
ctr_ run --rm --snapshotter "$SNAP" "$IMG" e2e-c2c /bin/sh -c "$LIST_SCRIPT" list / >"$W/c2c.list" 2>&1
compare_listing "a container after the containerd restart sees the pristine image" "$W/c2c.list" "$IMAGES/expected.list"
check_views "after the containerd restart"

step "commit container 1's snapshot; containers 3 and 4 see its writes"
check "ctr snapshots commit e2e-c1-commit e2e-c1" snaps commit e2e-c1-commit e2e-c1
check "ctr snapshots prepare e2e-c3 e2e-c1-commit" snaps prepare e2e-c3 e2e-c1-commit
mkdir -p "$W/c3root"
snaps mounts "$W/c3root" e2e-c3 >"$W/c3-mounts.sh" 2>&1
echo "mounts of e2e-c3: $(cat "$W/c3-mounts.sh")"
check "mount e2e-c3 as ctr snapshots mounts says" sh -c "sed 's/ -o *\$//' '$W/c3-mounts.sh' | sh -e"
ctr_ run --rootfs "$W/c3root" e2e-c3 /bin/sh -c "$LIST_SCRIPT" list / >"$W/c3.list" 2>&1
compare_listing "container 3 (on a snapshot of the commit) sees container 1's writes" "$W/c3.list" "$W/c1-after.list"
ctr_ containers rm e2e-c3 >/dev/null 2>&1
umount "$W/c3root" || fail "umount e2e-c3"
check "ctr snapshots view e2e-view e2e-c1-commit" snaps view e2e-view e2e-c1-commit
# (ctr's view, unlike prepare and commit, sets no gc.root label: without one the next GC removes it)
check "ctr snapshots label e2e-view containerd.io/gc.root" snaps label e2e-view containerd.io/gc.root=e2e
mkdir -p "$W/viewroot"
snaps mounts "$W/viewroot" e2e-view >"$W/view-mounts.sh" 2>&1
echo "mounts of e2e-view: $(cat "$W/view-mounts.sh")"
if sed 's/ -o *$//' "$W/view-mounts.sh" | sh -e; then
  [[ $(cat "$W/viewroot/data/c1-wrote" 2>&1) == c1 ]] && ! touch "$W/viewroot/data/new" 2>/dev/null &&
    pass "the view shows the commit, read-only" || fail "the view shows the commit, read-only" "$(ls -la "$W/viewroot/data" 2>&1 | head)"
  umount "$W/viewroot" || fail "umount e2e-view"
else
  fail "mount e2e-view as ctr snapshots mounts says"
fi
check_views "commit and prepare"

if snaps diff e2e-c1-commit >"$W/c1-diff.tar.gz" 2>"$W/c1-diff.err"; then
  pass "ctr snapshots diff e2e-c1-commit: a $(($(stat -c %s "$W/c1-diff.tar.gz") >> 10)) KiB layer"
  echo "diff layer: $(zcat "$W/c1-diff.tar.gz" | tar -tvf - 2>&1 | tr -s ' ' | cut -d' ' -f1,2,6- | tr '\n' ';')"
  $PY "$E2E/e2e.py" add-layer "$IMAGES/oci" latest "$W/c1-diff.tar.gz" application/vnd.oci.image.layer.v1.tar+gzip "$W/oci-committed" &&
    tar -C "$W/oci-committed" -cf "$W/committed.oci.tar" index.json oci-layout blobs ||
    fail "build an image from the diff"
  check "ctr images import of the committed image" ctr_ images import --snapshotter "$SNAP" --base-name localhost/e2e-committed "$W/committed.oci.tar"
  ctr_ run --rm --snapshotter "$SNAP" "$IMG2" e2e-c4 /bin/sh -c "$LIST_SCRIPT" list / >"$W/c4.list" 2>&1
  compare_listing "container 4 (image = layers + diff of the commit) sees container 1's writes" "$W/c4.list" "$W/c1-after.list"
else
  fail "ctr snapshots diff e2e-c1-commit" "$(cat "$W/c1-diff.err")"
fi
check_views "two images" full
else
  echo "(short scenario: no thinsnap/containerd restart, no commit/diff/view steps)"
fi

# ================================================================ cleanup
step "remove containers, snapshots and images; containerd's GC must leave nothing behind"
if [[ $SCENARIO == full ]]; then
  check "ctr containers rm e2e-c1 (its snapshot was committed away)" ctr_ containers rm e2e-c1
  for key in e2e-view e2e-c3 e2e-c1-commit; do check "ctr snapshots rm $key" snaps rm "$key"; done
  check "ctr images rm --sync (both images)" ctr_ images rm --sync "$IMG" "$IMG2"
else
  check "ctr containers rm e2e-c1 (and its snapshot)" ctr_ containers rm e2e-c1
  check "ctr images rm --sync $IMG" ctr_ images rm --sync "$IMG"
fi
gc_sync
t0=$SECONDS
while ((SECONDS - t0 < 120)); do
  n=$(($(snaps ls 2>/dev/null | wc -l) - 1))
  if [[ $SNAP == thinsnap ]]; then
    st=$(ts_status 2>/dev/null | jq -r '"\(.snapshots.active + .snapshots.view + .snapshots.committed) \(.thin_ids_in_use)"')
    ((n == 0)) && [[ $st == "0 1" ]] && [[ -z $(dm_snaps) ]] && break
  else
    ((n == 0)) && break
  fi
  sleep 2
done
echo "cleanup settled (or gave up) after $((SECONDS - t0))s"
n=$(($(snaps ls 2>/dev/null | wc -l) - 1))
((n == 0)) && pass "ctr snapshots ls: no snapshot left" || fail "ctr snapshots ls: no snapshot left ($n)" "$(snaps ls 2>&1)"
[[ -z $(ctr_ content ls -q 2>/dev/null) ]] && pass "ctr content ls: no blob left" || fail "ctr content ls: no blob left" "$(ctr content ls 2>&1)"
[[ -z $(ctr_ leases ls -q 2>/dev/null) ]] && pass "ctr leases ls: no lease left" || fail "ctr leases ls: no lease left" "$(ctr leases ls 2>&1)"
if [[ $SNAP == thinsnap ]]; then
  ts_status >"$W/status-end.json" 2>&1
  [[ $(jq -r '"\(.snapshots.active) \(.snapshots.view) \(.snapshots.committed) \(.thin_ids_in_use)"' "$W/status-end.json") == "0 0 0 1" ]] &&
    pass "thinsnap status: no snapshot record, one thin id in use (the base)" ||
    fail "thinsnap status: no snapshot record, one thin id in use (the base)" "$(jq -c '{snapshots, thin_ids_in_use}' "$W/status-end.json" 2>&1)"
  [[ -z $(dm_snaps) ]] && pass "dmsetup ls: no thin snapshot device left" || fail "dmsetup ls: no thin snapshot device left" "$(dm_snaps)"
  [[ -z $(mapper_snaps) ]] && pass "/dev/mapper: no $POOL-snap-* node left" || fail "/dev/mapper: no $POOL-snap-* node left" "$(mapper_snaps)"
  dmsetup ls | awk -v p="$POOL" 'index($1, p) == 1 {print $1}' | sort | no_spares >"$W/dm-end.txt"
  cmp -s "$W/dm-baseline.txt" "$W/dm-end.txt" && pass "dm devices are back to the fresh pool's: $(tr '\n' ' ' <"$W/dm-end.txt")" ||
    fail "dm devices are back to the fresh pool's" "$(diff "$W/dm-baseline.txt" "$W/dm-end.txt")"
  grep -q "/dev/mapper/$POOL-snap-" /proc/mounts && fail "no thin device mounted" "$(grep "$POOL" /proc/mounts)" || pass "no thin device mounted"
  used_end=$(jq -r '.data.used_bytes' "$W/status-end.json") used_fresh=$(jq -r '.data.used_bytes' "$W/status0.json")
  ((used_end <= used_fresh)) && pass "pool data space back to the fresh pool's: $used_end bytes used (fresh: $used_fresh)" ||
    fail "pool data space back to the fresh pool's: $used_end bytes used, fresh pool $used_fresh"

  step "restart thinsnap on the emptied pool"
  stop_thinsnap "restart 2"
  start_thinsnap "restart 2"
  [[ $(ts_status 2>/dev/null | jq -r '"\(.snapshots.active) \(.snapshots.view) \(.snapshots.committed) \(.thin_ids_in_use)"') == "0 0 0 1" ]] &&
    pass "still empty after the restart" || fail "still empty after the restart" "$(ts_status 2>&1)"
  ctr_ plugins ls | grep -E '^io\.containerd\.snapshotter\.v1[[:space:]]+thinsnap[[:space:]].*ok' >/dev/null &&
    pass "containerd still lists thinsnap ok" || fail "containerd still lists thinsnap ok"
fi

# ================================================================ shutdown
step "shut down; thinsnap pool destroy --remove-files"
stop_containerd final
if [[ $SNAP == thinsnap ]]; then
  stop_thinsnap final
  if out=$(T "$BIN" pool destroy --config "$TCONF" --remove-files 2>&1); then pass "thinsnap pool destroy --remove-files"; else
    fail "thinsnap pool destroy --remove-files" "$out"
  fi
  echo "$out" >>"$RESULTS/thinsnap.log"
  [[ -z $(dmsetup ls 2>/dev/null | awk -v p="$POOL" 'index($1, p) == 1') ]] && pass "no $POOL dm device left" ||
    fail "no $POOL dm device left" "$(dmsetup ls)"
  [[ -z $(losetup -a | grep "$W/thinsnap/") ]] && pass "no loop device left on the pool files" ||
    fail "no loop device left on the pool files" "$(losetup -a)"
  [[ ! -e $W/thinsnap/root/pool ]] && pass "pool files removed" || fail "pool files removed" "$(ls -la "$W/thinsnap/root/pool")"
fi
teardown
umount "$CROOT" 2>/dev/null
finish
}
