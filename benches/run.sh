#!/usr/bin/env bash
# The benchmark command (benches/README.md): builds everything on the host, runs every phase in
# ONE VM on real dm-thin, and writes benches/RESULTS.md from what that run measured.
#
#   benches/run.sh                 # the issue's counts; about 30-45 minutes on a 2-core host
#   BENCH_OPS=100 BENCH_SNAPSHOTS=2000 BENCH_ACTIVE=200 benches/run.sh    # a quicker, smaller run
#
# Environment (defaults in brackets): BENCH_OPS [500] calls per kind in (b); BENCH_DM_OPS
# [BENCH_OPS] the same for devmapper's (b) alone; BENCH_BATCH [25];
# BENCH_CHAIN [16] parent chain depth; BENCH_CLIENTS [8] and BENCH_CONC_OPS [64] per client for
# (c); BENCH_ITERS [3] benchsuite iterations; BENCH_SNAPSHOTS [10000] and BENCH_ACTIVE [1000] for
# (d); BENCH_RESTARTS [3]; pool: BENCH_DATA_MIB [2048], BENCH_META_MIB [256], BENCH_BLOCK_KIB [64],
# BENCH_BASE_MIB [128]; BENCH_PHASES ["devmapper thinsnap startup floor cstart"];
# BENCH_STORAGE ["tmpfs disk"] where pool files and stores live (every phase runs once per storage;
# disk = ext4 on a sparse image attached to the VM: BENCH_DISK_IMG [benches/.results/disk.img],
# made afresh, BENCH_DISK_GIB [16]); (g) container start: BENCH_CONTAINERS [50], BENCH_LAYERS [5],
# BENCH_SPARES [8] thinsnap's [spares] count for the spares-on variant (0: not run; 8, the
# default count, writes no [spares] key: the default configuration);
# (d): BENCH_FILL_CLIENTS [16], BENCH_FIRST_MOUNTS [20]; BENCH_RESULTS (the
# results dir, default benches/.results/run-<date>); BENCH_REPORT (default benches/RESULTS.md);
# BENCH_BURST [10] Prepares at once on the image's top layer, BENCH_BURSTS [3] bursts;
# (j) unpacks: BENCH_UNPACKS [3] images of BENCH_UNPACK_LAYERS [6] layers (0: none);
# BENCH_PROFILE [release] or debug (a debug daemon, no floor phase); BENCH_PHASE_SPARES [0]: the
# thinsnap and startup phases with spares off, or `default` (thinsnap's default count);
# BENCH_SKIP_BUILD=1 reuses target/release as it is (the Go driver is always rebuilt: seconds);
# VM_TIMEOUT [3600] and the rest of integration/vm.sh's variables.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
cd "$REPO"
export PATH="$HOME/.cargo/bin:$HOME/.pyenv/shims:$HOME/.local/bin:/usr/local/bin:$PATH"
export CARGO_TERM_COLOR=${CARGO_TERM_COLOR:-never}

# The exact command, with every BENCH_/VM_ variable that was set, for the report.
cmdline="benches/run.sh"
for v in $(compgen -e | grep -E '^(BENCH_|VM_)' | grep -vE '^(BENCH_RESULTS|BENCH_REPORT)$' | sort); do
  cmdline="$v=${!v} $cmdline"
done

if [[ ${BENCH_SKIP_BUILD:-0} == 1 ]]; then
  echo "run.sh: BENCH_SKIP_BUILD=1: using the binaries already built"
fi
echo "run.sh: building (release)"
# One build, release profile, for the daemon and the floor bench (`cargo bench --no-run` would
# build both again under the bench profile).
target=${CARGO_TARGET_DIR:-$REPO/target}
profile=release
if [[ ${BENCH_PROFILE:-release} == debug ]]; then
  # A debug daemon and no floor bench: only for runs without the floor phase, when a release
  # build does not fit in the time (the report's figures are then the debug build's).
  profile=debug
  [[ ${BENCH_SKIP_BUILD:-0} == 1 ]] || cargo build --bin thinsnap
  floor=/bin/false
elif [[ ${BENCH_SKIP_BUILD:-0} == 1 ]]; then
  floor=$(ls -t "$target"/release/deps/dm_floor-* 2>/dev/null | grep -v '\.d$' | head -n1)
else
  cargo build --release --bin thinsnap --bench dm_floor
  floor=$(cargo build --release --bench dm_floor --message-format=json 2>/dev/null |
    sed -n 's/.*"executable":"\([^"]*\/dm_floor-[^"]*\)".*/\1/p' | tail -n1)
fi
[[ -x $floor ]] || { echo "run.sh: cannot find the dm_floor bench executable" >&2; exit 1; }

echo "run.sh: building the Go driver (GOPATH mode, Debian's containerd 1.6 source)"
[[ -d /usr/share/gocode/src/github.com/containerd/containerd/snapshots/devmapper ]] ||
  { echo "run.sh: golang-github-containerd-containerd-dev is not installed (integration/install-deps.sh)" >&2; exit 1; }
build=$REPO/benches/.build
mkdir -p "$build/gopath"
(cd benches/driver && GO111MODULE=off GOPATH="$build/gopath:/usr/share/gocode" GOFLAGS= GOPROXY=off \
  go build -o "$build/driver" .)

results=${BENCH_RESULTS:-$REPO/benches/.results/run-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$results"
results=$(cd "$results" && pwd -P)
export BENCH_DRIVER=$build/driver BENCH_FLOOR=$floor THINSNAP_BIN=$target/$profile/thinsnap
pass="BENCH_DRIVER BENCH_FLOOR"
for v in $(compgen -e | grep -E '^BENCH_' | grep -vE '^(BENCH_DRIVER|BENCH_FLOOR|BENCH_RESULTS|BENCH_REPORT)$'); do
  pass="$pass $v"
done

# The disk for BENCH_STORAGE=disk: a sparse raw image on the host (not under /tmp, which the
# guest does not share), attached to the VM (vng --disk) and made ext4 by guest.sh.
disks=${VM_DISKS:-}
if [[ " ${BENCH_STORAGE:-tmpfs disk} " == *" disk "* ]]; then
  img=${BENCH_DISK_IMG:-$REPO/benches/.results/disk.img}
  mkdir -p "$(dirname "$img")"
  rm -f "$img"
  truncate -s "${BENCH_DISK_GIB:-16}G" "$img"
  disks="$img $disks"
fi

echo "run.sh: one VM, results in ${results#"$REPO"/}"
status=0
VM_DISKS=$disks VM_RESULTS=$results VM_PASS_ENV="$pass ${VM_PASS_ENV:-}" VM_TIMEOUT=${VM_TIMEOUT:-3600} \
  integration/vm.sh benches/guest.sh || status=$?

report=${BENCH_REPORT:-$REPO/benches/RESULTS.md}
BENCH_REPO=$REPO "$build/driver" -mode report -dir "$results" -out "$report" -command "$cmdline" \
  -clients "${BENCH_CLIENTS:-8}"
echo "run.sh: report in ${report#"$REPO"/} (VM exit status $status)"
[[ -n ${img:-} ]] && rm -f "$img"
exit "$status"
