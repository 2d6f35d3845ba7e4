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
FLOOR=${BENCH_FLOOR:-}
# The daemon runs from the guest's tmpfs, not from the host's tree over 9p: on a node the binary
# sits on a local disk, while here every exec would page the 70 MB binary in over 9p under
# emulation (seconds per start, which the start-up phase (d) would otherwise measure).
cp "${THINSNAP_BIN:?}" /tmp/thinsnap-bench || exit 1
THINSNAP=/tmp/thinsnap-bench
DATA_MIB=${BENCH_DATA_MIB:-2048}
META_MIB=${BENCH_META_MIB:-256}
BLOCK_KIB=${BENCH_BLOCK_KIB:-64}
BASE_MIB=${BENCH_BASE_MIB:-128}
PHASES=${BENCH_PHASES:-devmapper thinsnap startup floor cstart}
STORAGES=${BENCH_STORAGE:-tmpfs disk}
SPARES=${BENCH_SPARES:-8}
# thinsnap's default `[spares] count` (src/config/mod.rs DEFAULT_SPARES): a spares-on run at this
# count writes no [spares] key, so it runs the default configuration.
DEFAULT_SPARES=8
CONTAINERS=${BENCH_CONTAINERS:-50}
# Where the pool files and every store go for the storage being run (set by use_storage), and
# the suffix of its result files and pool names ("" for tmpfs, so the tmpfs files keep their names).
BASE=/tmp
SFX=""
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
  echo "  \"storages\": \"$STORAGES\", \"spares\": $SPARES, \"containers\": $CONTAINERS, \"layers\": ${BENCH_LAYERS:-5},"
  echo "  \"fill_clients\": ${BENCH_FILL_CLIENTS:-16}, \"first_mounts\": ${BENCH_FIRST_MOUNTS:-20},"
  echo "  \"counts\": \"ops=${BENCH_OPS:-500} batch=${BENCH_BATCH:-25} chain=${BENCH_CHAIN:-16} clients=${BENCH_CLIENTS:-8} conc_ops=${BENCH_CONC_OPS:-64} iters=${BENCH_ITERS:-3} snapshots=${BENCH_SNAPSHOTS:-10000} active=${BENCH_ACTIVE:-1000} restarts=${BENCH_RESTARTS:-3} dm_ops=${BENCH_DM_OPS:-${BENCH_OPS:-500}} containers=$CONTAINERS layers=${BENCH_LAYERS:-5} spares=$SPARES fill_clients=${BENCH_FILL_CLIENTS:-16} first_mounts=${BENCH_FIRST_MOUNTS:-20} storages=${STORAGES// /+}\","
  echo "  \"started\": \"$(date -u +%FT%TZ)\""
  echo "}"
} >"$R/env.json"

# The disk: the first disk vm.sh attached (/dev/vda here) (VM_DISKS), or BENCH_DISK_DEV; made ext4 and
# mounted on /tmp/disk (the guest's /tmp is its own tmpfs, so the mount point can be made).
DISK_INFO=""
setup_disk() {
  local dev=${BENCH_DISK_DEV:-} i
  modprobe virtio_scsi 2>/dev/null
  modprobe sd_mod 2>/dev/null
  for i in $(seq 50); do
    [[ -n $dev ]] && break
    for d in /dev/sd? /dev/vd?; do
      [[ -b $d ]] && ! grep -q "^$d" /proc/mounts && { dev=$d; break; }
    done
    [[ -n $dev ]] || sleep 0.2
  done
  [[ -b $dev ]] || { echo "guest.sh: no disk for BENCH_STORAGE=disk (vm.sh VM_DISKS, or BENCH_DISK_DEV)" >&2; return 1; }
  mkfs.ext4 -q -F -E nodiscard "$dev" || return 1
  mkdir -p /tmp/disk && mount -t ext4 "$dev" /tmp/disk || return 1
  DISK_INFO="$dev $(($(blockdev --getsize64 "$dev") >> 20)) MiB, $(cat /sys/block/"${dev##*/}"/device/model 2>/dev/null | xargs) ($(cat /sys/block/"${dev##*/}"/queue/scheduler 2>/dev/null)), ext4 mounted $(grep " /tmp/disk " /proc/mounts | awk '{print $4}')"
  echo "guest.sh: disk $DISK_INFO"
}

use_storage() {
  case $1 in
    tmpfs) BASE=/tmp SFX="" ;;
    disk) BASE=/tmp/disk SFX="-disk" ;;
    *) echo "guest.sh: unknown storage $1" >&2; return 1 ;;
  esac
}

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
  local p=bdm$SFX d=$BASE/bdm
  mkpool $p "$d" || return 1
  # devmapper's calls cost seconds each under emulation: BENCH_DM_OPS may give it fewer.
  "$DRIVER" -mode devmapper -pool $p -root "$d/root" -base-size "${BASE_MIB}MiB" \
    "${common[@]}" -ops "${BENCH_DM_OPS:-${BENCH_OPS:-500}}" -out "$R/devmapper$SFX.json"
  local rc=$?
  dmsetup status $p
  rmpool $p "$d"
  return $rc
}

run_thinsnap() {
  local p=bts$SFX d=$BASE/bts
  tsconfig $p "$d" 127.0.0.1:9464
  # (a)-(c) and (d) as in the runs recorded before spares were on by default (issue 25): off.
  # BENCH_PHASE_SPARES=default runs them with thinsnap's default count.
  [[ ${BENCH_PHASE_SPARES:-0} == default ]] || printf '[spares]\ncount = 0\n' >>"$d/config.toml"
  "$DRIVER" -mode thinsnap -bin "$THINSNAP" -config "$d/config.toml" -sock "$d/thinsnap.sock" \
    -pool $p -log "$d/daemon.log" -metrics http://127.0.0.1:9464/metrics "${common[@]}" -out "$R/thinsnap$SFX.json"
  local rc=$?
  # The daemon logs next to its store while measured (the results dir is 9p: slow writes).
  cp "$d/daemon.log" "$R/thinsnap$SFX-daemon.log"
  dmsetup status $p
  "$THINSNAP" pool destroy --config "$d/config.toml" --remove-files || rc=1
  rm -rf "$d"
  return $rc
}

run_startup() {
  local p=bst$SFX d=$BASE/bst
  tsconfig $p "$d"
  [[ ${BENCH_PHASE_SPARES:-0} == default ]] || printf '[spares]\ncount = 0\n' >>"$d/config.toml"
  "$DRIVER" -mode startup -bin "$THINSNAP" -config "$d/config.toml" \
    -sock "$d/thinsnap.sock" -pool $p -log "$d/daemon.log" \
    -fill-clients "${BENCH_FILL_CLIENTS:-16}" -first-mounts "${BENCH_FIRST_MOUNTS:-20}" \
    -snapshots "${BENCH_SNAPSHOTS:-10000}" -active "${BENCH_ACTIVE:-1000}" \
    -restarts "${BENCH_RESTARTS:-3}" -out "$R/startup$SFX.json"
  local rc=$?
  cp "$d/daemon.log" "$R/startup$SFX-daemon.log"
  dmsetup status $p
  "$THINSNAP" pool destroy --config "$d/config.toml" --remove-files || rc=1
  rm -rf "$d"
  return $rc
}

run_floor() {
  local p=bfl$SFX d=$BASE/bfl
  [[ -x $FLOOR ]] || { echo "floor: no BENCH_FLOOR executable (BENCH_PROFILE=debug builds none)" >&2; return 1; }
  mkpool $p "$d" || return 1
  local out=$R/floor$SFX.json
  [[ -e /run/udev/control ]] || out=$R/floor-noudev$SFX.json
  "$FLOOR" --pool $p --ops "${BENCH_OPS:-500}" --chain "${BENCH_CHAIN:-16}" \
    --base-size $((BASE_MIB << 20)) --out "$out"
  local rc=$?
  rmpool $p "$d"
  return $rc
}

# The container-start path (g) and the burst: thinsnap with spares off, with spares on
# (BENCH_SPARES > 0; at thinsnap's default count, the default configuration), containerd's
# devmapper and containerd's overlayfs (both in process), each on a fresh pool (overlayfs: a fresh
# directory) of this storage.
cs_common=(-mode cstart -containers "$CONTAINERS" -layers "${BENCH_LAYERS:-5}" -ops "${BENCH_OPS:-500}"
  -burst "${BENCH_BURST:-10}" -bursts "${BENCH_BURSTS:-3}"
  -unpack-layers "${BENCH_UNPACK_LAYERS:-6}" -unpacks "${BENCH_UNPACKS:-3}")
run_cstart_ts() {
  local p=bcs$SFX d=$BASE/bcs spares=${1:-0} name=cstart-ts
  ((spares > 0)) && name=cstart-ts-spares
  tsconfig $p "$d" 127.0.0.1:9464
  if ((spares == 0)); then
    printf '[spares]\ncount = 0\n' >>"$d/config.toml"
  elif ((spares != DEFAULT_SPARES)); then
    printf '[spares]\ncount = %d\n' "$spares" >>"$d/config.toml"
  fi
  "$DRIVER" "${cs_common[@]}" -target thinsnap -spares "$spares" -bin "$THINSNAP" -config "$d/config.toml" \
    -sock "$d/thinsnap.sock" -pool $p -log "$d/daemon.log" -metrics http://127.0.0.1:9464/metrics \
    -out "$R/$name$SFX.json"
  local rc=$?
  cp "$d/daemon.log" "$R/$name$SFX-daemon.log"
  dmsetup status $p
  "$THINSNAP" pool destroy --config "$d/config.toml" --remove-files || rc=1
  rm -rf "$d"
  return $rc
}
run_cstart_ov() {
  local d=$BASE/bco
  mkdir -p "$d/root"
  "$DRIVER" "${cs_common[@]}" -target overlayfs -root "$d/root" -out "$R/cstart-ov$SFX.json"
  local rc=$?
  rm -rf "$d"
  return $rc
}
run_cstart_dm() {
  local p=bcd$SFX d=$BASE/bcd
  mkpool $p "$d" || return 1
  "$DRIVER" "${cs_common[@]}" -target devmapper -pool $p -root "$d/root" -base-size "${BASE_MIB}MiB" \
    -out "$R/cstart-dm$SFX.json"
  local rc=$?
  dmsetup status $p
  rmpool $p "$d"
  return $rc
}

# The floor again with udev stopped (phase floor-noudev, last: udevd does not come back in this
# VM): the crate then waits for no uevent and dm_floor makes the /dev/mapper node itself, so
# floor-noudev.json against floor.json splits a resume and a removal into the kernel's work and
# the wait for udev's rules.
run_floor-noudev() {
  udevadm control --exit 2>/dev/null
  for _ in $(seq 50); do pgrep -x systemd-udevd >/dev/null || break; sleep 0.1; done
  pgrep -x systemd-udevd >/dev/null && { echo "floor-noudev: udevd still running" >&2; return 1; }
  # udevd leaves its control socket behind; libdevmapper and the devicemapper crate take the
  # socket's presence for udev running (and would wait for it forever).
  rm -f /run/udev/control
  run_floor
}

rm -f "$R/phases.txt"
for s in $STORAGES; do
  if [[ $s == disk ]]; then
    if ! setup_disk; then
      echo "disk FAILED 0" >>"$R/phases.txt"
      status=1
      continue
    fi
    echo "{\"disk\": \"$DISK_INFO\"}" >"$R/disk.json"
  fi
  use_storage "$s" || { status=1; continue; }
  for p in $PHASES; do
    case $p in
      devmapper | thinsnap | startup | floor | floor-noudev) phase "$p$SFX" "run_$p" ;;
      cstart)
        phase "cstart-ts$SFX" run_cstart_ts 0
        if ((SPARES > 0)); then
          phase "cstart-ts-spares$SFX" run_cstart_ts "$SPARES"
        else
          echo "cstart-ts-spares$SFX skipped 0" >>"$R/phases.txt"
        fi
        phase "cstart-dm$SFX" run_cstart_dm
        phase "cstart-ov$SFX" run_cstart_ov
        ;;
      *) echo "unknown phase $p" >&2; status=1 ;;
    esac
  done
  [[ $s == disk ]] && umount /tmp/disk
done
cat "$R/phases.txt"
exit $status
