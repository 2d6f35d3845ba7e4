#!/bin/bash
# Inside the VM (started by benches/run.sh through integration/vm.sh): every benchmark phase, each
# on its own fresh loop-backed thin pool with the same settings, results as JSON in $VM_RESULTS.
# Not meant to be run by hand; see benches/README.md.
set -uo pipefail
# shellcheck source=../integration/guest/lib.sh
. "$GUEST_REPO/integration/guest/lib.sh"
guest_prelude

R=$VM_RESULTS
DRIVER=${BENCH_DRIVER:?}
FLOOR=${BENCH_FLOOR:?}
# The daemon runs from the guest's tmpfs, not from the host's tree over 9p: on a node the binary
# sits on a local disk, while here every exec would page the 70 MB binary in over 9p under
# emulation (seconds per start, which the start-up phase (d) would otherwise measure).
cp "${THINSNAP_BIN:?}" /tmp/thinsnap-bench || exit 1
THINSNAP=/tmp/thinsnap-bench
DATA_MIB=${BENCH_DATA_MIB:-2048}
META_MIB=${BENCH_META_MIB:-256}
BLOCK_KIB=${BENCH_BLOCK_KIB:-64}
BASE_MIB=${BENCH_BASE_MIB:-128}
PHASES=${BENCH_PHASES:-devmapper thinsnap startup floor}
common=(-ops "${BENCH_OPS:-500}" -batch "${BENCH_BATCH:-25}" -chain "${BENCH_CHAIN:-16}"
  -clients "${BENCH_CLIENTS:-8}" -conc-ops "${BENCH_CONC_OPS:-64}" -bench-iters "${BENCH_ITERS:-3}")

{
  echo "{"
  echo "  \"kernel\": \"$(uname -r)\","
  echo "  \"uname\": \"$(uname -a)\","
  echo "  \"vcpus\": $(nproc),"
  echo "  \"mem_mib\": $(awk '/MemTotal/ {print int($2/1024)}' /proc/meminfo),"
  echo "  \"cpu\": \"$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n1)\","
  echo "  \"dmsetup\": \"$(dmsetup --version | tr '\n' ' ')\","
  echo "  \"mkfs\": \"$(mkfs.ext4 -V 2>&1 | head -n1)\","
  echo "  \"data_mib\": $DATA_MIB, \"metadata_mib\": $META_MIB, \"block_kib\": $BLOCK_KIB, \"base_mib\": $BASE_MIB,"
  echo "  \"phases\": \"$PHASES\","
  echo "  \"counts\": \"ops=${BENCH_OPS:-500} batch=${BENCH_BATCH:-25} chain=${BENCH_CHAIN:-16} clients=${BENCH_CLIENTS:-8} conc_ops=${BENCH_CONC_OPS:-64} iters=${BENCH_ITERS:-3} snapshots=${BENCH_SNAPSHOTS:-10000} active=${BENCH_ACTIVE:-1000} restarts=${BENCH_RESTARTS:-3}\","
  echo "  \"started\": \"$(date -u +%FT%TZ)\""
  echo "}"
} >"$R/env.json"

# mkpool NAME DIR: the thin pool thinsnap makes in loop mode (src/pool/loopback.rs), made with dmsetup:
# sparse files on loop devices, the same block size, low-water mark and skip_block_zeroing.
mkpool() {
  local name=$1 dir=$2 data meta sectors blk
  mkdir -p "$dir"
  truncate -s "${DATA_MIB}M" "$dir/data"
  truncate -s "${META_MIB}M" "$dir/metadata"
  data=$(losetup -f --show "$dir/data") || return 1
  meta=$(losetup -f --show "$dir/metadata") || return 1
  blk=$((BLOCK_KIB * 2))
  sectors=$((DATA_MIB * 2048 / blk * blk))
  local blocks=$((sectors / blk)) low
  low=$((blocks / 100))
  ((low < 1)) && low=1
  dmsetup create "$name" --table "0 $sectors thin-pool $meta $data $blk $low 1 skip_block_zeroing"
}

rmpool() {
  local name=$1 dir=$2 d
  for d in $(dmsetup ls 2>/dev/null | awk -v p="$name-" 'index($1, p) == 1 {print $1}'); do
    dmsetup remove "$d" || true
  done
  dmsetup remove "$name" || true
  for f in "$dir/data" "$dir/metadata"; do
    losetup -j "$f" | cut -d: -f1 | xargs -r -n1 losetup -d
  done
  rm -rf "$dir"
}

# thinsnap's config for pool NAME under DIR, with the same settings.
tsconfig() {
  local name=$1 dir=$2
  mkdir -p "$dir"
  cat >"$dir/config.toml" <<EOF
root = "$dir/state"
address = "$dir/thinsnap.sock"
[pool]
name = "$name"
mode = "loop"
data_size = "${DATA_MIB}MiB"
metadata_size = "${META_MIB}MiB"
block_size = "${BLOCK_KIB}KiB"
[fs]
type = "ext4"
base_size = "${BASE_MIB}MiB"
EOF
  # A third argument: the metrics endpoint's host:port (store flushes per call, see -metrics).
  if [[ -n ${3:-} ]]; then
    printf '[metrics]\naddress = "%s"\n' "$3" >>"$dir/config.toml"
  fi
}

status=0
phase() {
  local name=$1 start
  shift
  say "PHASE $name: $*"
  start=$(date +%s)
  if "$@" 2>&1 | tee "$R/$name.log"; then
    echo "$name ok $(($(date +%s) - start))" >>"$R/phases.txt"
  else
    echo "$name FAILED $(($(date +%s) - start))" >>"$R/phases.txt"
    status=1
  fi
}

run_devmapper() {
  mkpool bdm /tmp/bdm || return 1
  "$DRIVER" -mode devmapper -pool bdm -root /tmp/bdm/root -base-size "${BASE_MIB}MiB" \
    "${common[@]}" -out "$R/devmapper.json"
  local rc=$?
  dmsetup status bdm
  rmpool bdm /tmp/bdm
  return $rc
}

run_thinsnap() {
  tsconfig bts /tmp/bts 127.0.0.1:9464
  "$DRIVER" -mode thinsnap -bin "$THINSNAP" -config /tmp/bts/config.toml -sock /tmp/bts/thinsnap.sock \
    -pool bts -log /tmp/bts/daemon.log -metrics http://127.0.0.1:9464/metrics "${common[@]}" -out "$R/thinsnap.json"
  local rc=$?
  # The daemon logs to the guest's tmpfs while measured (the results dir is 9p: slow writes).
  cp /tmp/bts/daemon.log "$R/thinsnap-daemon.log"
  dmsetup status bts
  "$THINSNAP" pool destroy --config /tmp/bts/config.toml --remove-files || rc=1
  return $rc
}

run_startup() {
  tsconfig bst /tmp/bst
  "$DRIVER" -mode startup -bin "$THINSNAP" -config /tmp/bst/config.toml \
    -sock /tmp/bst/thinsnap.sock -pool bst -log /tmp/bst/daemon.log \
    -clients "${BENCH_CLIENTS:-8}" -snapshots "${BENCH_SNAPSHOTS:-10000}" -active "${BENCH_ACTIVE:-1000}" \
    -restarts "${BENCH_RESTARTS:-3}" -out "$R/startup.json"
  local rc=$?
  cp /tmp/bst/daemon.log "$R/startup-daemon.log"
  dmsetup status bst
  "$THINSNAP" pool destroy --config /tmp/bst/config.toml --remove-files || rc=1
  return $rc
}

run_floor() {
  mkpool bfl /tmp/bfl || return 1
  "$FLOOR" --pool bfl --ops "${BENCH_OPS:-500}" --chain "${BENCH_CHAIN:-16}" \
    --base-size $((BASE_MIB << 20)) --out "$R/floor.json"
  local rc=$?
  rmpool bfl /tmp/bfl
  return $rc
}

rm -f "$R/phases.txt"
for p in $PHASES; do
  case $p in
    devmapper | thinsnap | startup | floor) phase "$p" "run_$p" ;;
    *) echo "unknown phase $p" >&2; status=1 ;;
  esac
done
cat "$R/phases.txt"
exit $status
