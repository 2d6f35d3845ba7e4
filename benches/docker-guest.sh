#!/bin/bash
# The Docker bench, inside the VM (benches/docker.sh boots it): one dockerd version, side by side
# in one run, on three storages under the same dockerd and containerd:
#   thinsnap (spares off), thinsnap ([spares] count = BENCH_SPARES), containerd's overlayfs;
# (1) `docker run --rm` of a small image (build-images.py's small image: busybox): p50 and p99
#     of BENCH_DOCKER_RUNS runs after BENCH_DOCKER_WARMUP unmeasured ones;
# (2) `docker commit` of a running container (default pause) against the same commit after the
#     container stopped, BENCH_DOCKER_COMMITS times each, after a 1 MiB file written.
# Writes $VM_RESULTS/docker-bench.md (a table) and docker-bench.tsv (every sample).
# A measurement, not a test: it fails only if a step it measures fails.
{
set -uo pipefail
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
REPO=$(cd "$HERE/.." && pwd -P)
E2E=$REPO/integration/e2e
: "${VM_RESULTS:?run inside the VM via integration/vm.sh (benches/docker.sh)}"
export GUEST_REPO=${GUEST_REPO:-$REPO}
# shellcheck source=../integration/guest/lib.sh
. "$REPO/integration/guest/lib.sh"
guest_prelude

CACHE=${THINSNAP_TEST_CACHE:-/var/lib/thinsnap-test/cache}
V=${BENCH_DOCKER_VERSION:-28.5.2}
RUNS=${BENCH_DOCKER_RUNS:-30}
WARM=${BENCH_DOCKER_WARMUP:-3}
COMMITS=${BENCH_DOCKER_COMMITS:-5}
SPARES=${BENCH_SPARES:-8}
BIN0=${THINSNAP_BIN:-$REPO/target/release/thinsnap}
IMAGES=${E2E_IMAGES:-$REPO/integration/.results/e2e-images}
REGISTRY=127.0.0.1:5002
PY=/usr/bin/python3
case $V in 26.*) CDV=1.7.24 CFG=containerd-config.toml ;; *) CDV=2.1.9 CFG=containerd-config-v3.toml ;; esac
DBIN=$CACHE/docker/$V CDBIN=$CACHE/containerd/$CDV/usr/bin
W=/tmp/docker-bench
OUT=$VM_RESULTS
TSV=$OUT/docker-bench.tsv
rm -rf "$W" && mkdir -p "$W/bin" "$W/config/cli-plugins"
cp "$DBIN/usr/bin/docker" "$W/bin/" && cp "$DBIN/usr/libexec/docker/cli-plugins/docker-buildx" "$W/config/cli-plugins/" &&
  cp "$BIN0" "$W/bin/thinsnap" || { echo "FAIL: Docker $V / thinsnap binaries (integration/fetch-containerd.sh, cargo build)"; exit 1; }
export PATH=$W/bin:$CDBIN:$DBIN/usr/sbin:$DBIN/usr/bin:$PATH DOCKER_CONFIG=$W/config DOCKER_HOST=unix://$W/docker.sock
ms() { echo $(($(date +%s%N) / 1000000)); }
die() { echo "FAIL: $*"; teardown; exit 1; }

# ---- registry and image
mkdir -p "$W/registry"
printf 'version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: %s\nhttp:\n  addr: %s\n' "$W/registry" "$REGISTRY" >"$W/registry.yml"
docker-registry serve "$W/registry.yml" >"$OUT/bench-registry.log" 2>&1 &
REG_PID=$!
for _ in $(seq 120); do $PY -c 'import urllib.request; urllib.request.urlopen("http://'$REGISTRY'/v2/", timeout=2)' 2>/dev/null && break; sleep 0.5; done
echo '{"default": [{"type": "insecureAcceptAnything"}]}' >"$W/policy.json"
$PY "$E2E/build-images.py" --check "$IMAGES" >/dev/null 2>&1 || { IMAGES=$W/images; $PY "$E2E/build-images.py" "$IMAGES" >/dev/null; }
IMG=$REGISTRY/small:latest
skopeo --policy "$W/policy.json" copy --quiet --dest-tls-verify=false "oci:$IMAGES/small-oci:latest" "docker://$IMG" || { echo "FAIL: registry"; exit 1; }

TS_PID='' CD_PID='' DD_PID=''
stop_pid() {
  [[ -n $1 ]] || return 0
  kill -TERM "$1" 2>/dev/null
  local t0=$SECONDS
  while kill -0 "$1" 2>/dev/null && ((SECONDS - t0 < 120)); do sleep 0.3; done
  kill -0 "$1" 2>/dev/null && kill -KILL "$1"
  wait "$1" 2>/dev/null
  return 0
}
teardown() {
  docker ps -aq 2>/dev/null | xargs -r docker rm -f >/dev/null 2>&1
  stop_pid "$DD_PID"; stop_pid "$CD_PID"; stop_pid "$TS_PID"
  DD_PID='' CD_PID='' TS_PID=''
  grep -o " $W/s[^ ]*" /proc/mounts | sort -r | xargs -r -n1 umount -l 2>/dev/null
  [[ -f $W/s/thinsnap.toml ]] && thinsnap pool destroy --config "$W/s/thinsnap.toml" --remove-files >/dev/null 2>&1
  rm -rf "$W/s"
}

# start STORAGE: thinsnap (with $1 = thinsnap-N: N spares) or overlayfs, containerd, dockerd
start() {
  local s=$1 driver=thinsnap
  mkdir -p "$W/s/containerd"
  truncate -s 4G "$W/s/containerd.img" && mkfs.ext4 -q -F "$W/s/containerd.img" && mount -o loop "$W/s/containerd.img" "$W/s/containerd" || return 1
  # thinsnap runs in every storage (containerd's config names its proxy plugin), used by two
  cat >"$W/s/thinsnap.toml" <<EOF
root = "$W/s/thinsnap-root"
address = "$W/s/thinsnap.sock"
[pool]
name = "tsbench"
mode = "loop"
data_size = "4GiB"
metadata_size = "128MiB"
[fs]
type = "ext4"
base_size = "1GiB"
[spares]
count = ${s#thinsnap-}
EOF
  [[ $s == overlayfs ]] && { sed -i 's/^count = .*/count = 0/' "$W/s/thinsnap.toml"; driver=overlayfs; }
  thinsnap serve --config "$W/s/thinsnap.toml" >>"$OUT/bench-thinsnap.log" 2>&1 &
  TS_PID=$!
  local t0=$SECONDS
  until thinsnap status --config "$W/s/thinsnap.toml" >/dev/null 2>&1; do ((SECONDS - t0 > 300)) && return 1; sleep 0.5; done
  {
    echo "root = \"$W/s/containerd/root\""
    echo "state = \"$W/s/containerd/state\""
    bash "$E2E/deploy-snippet.sh" "$REPO/deploy/$CFG" "$W/s/thinsnap.sock" "$W/s/thinsnap-root"
    echo "[grpc]"
    echo "  address = \"$W/s/containerd.sock\""
  } >"$W/s/containerd.toml" || return 1
  containerd --config "$W/s/containerd.toml" >>"$OUT/bench-containerd.log" 2>&1 &
  CD_PID=$!
  t0=$SECONDS
  until ctr --address "$W/s/containerd.sock" version >/dev/null 2>&1; do ((SECONDS - t0 > 120)) && return 1; sleep 0.5; done
  jq --arg d "$driver" '."storage-driver" = $d' "$REPO/deploy/docker-daemon.json" >"$W/s/daemon.json"
  dockerd --config-file "$W/s/daemon.json" --containerd="$W/s/containerd.sock" --data-root "$W/s/docker" --exec-root "$W/s/exec" --pidfile "$W/s/docker.pid" \
    -H "$DOCKER_HOST" --iptables=false --ip6tables=false --bridge=none --insecure-registry "$REGISTRY" >>"$OUT/bench-dockerd.log" 2>&1 &
  DD_PID=$!
  t0=$SECONDS
  until docker version >/dev/null 2>&1; do ((SECONDS - t0 > 180)) && return 1; sleep 0.5; done
  [[ $(docker info --format '{{.Driver}}') == "$driver" ]] || return 1
  docker pull -q "$IMG" >/dev/null
}

# pct FILE P: the P-th percentile (nearest rank) of the numbers in FILE
pct() { sort -n "$1" | awk -v p="$2" '{a[NR] = $1} END {r = int((p * NR + 99) / 100); if (r < 1) r = 1; print a[r]}'; }

echo -e "storage\tmeasure\tms" >"$TSV"
declare -A P50 P99 CRUN CSTOP
# With spares on, before each run (untimed): the refiller has settled, its ready count above 0
# and unchanged for a second (at most 60 s), as after a quiet spell on a node.
settle_spares() {
  local t0=$SECONDS last=-1 same=0 n
  while ((SECONDS - t0 < 60 && same < 5)); do
    n=$(thinsnap status --config "$W/s/thinsnap.toml" --json | jq -r '.spares.ready')
    if [[ $n == "$last" && $n != 0 ]]; then same=$((same + 1)); else same=0 last=$n; fi
    sleep 0.2
  done
}
STORAGES=("thinsnap-0" "thinsnap-$SPARES" overlayfs)
((SPARES > 0)) || STORAGES=("thinsnap-0" overlayfs)
for s in "${STORAGES[@]}"; do
  echo "==== $s: Docker $V on containerd $CDV"
  start "$s" || die "start the stack on $s (logs in $OUT/bench-*.log)"
  for ((i = 0; i < WARM; i++)); do docker run --rm --network none "$IMG" /bin/busybox true >/dev/null || die "docker run on $s"; done
  : >"$W/runs"
  for ((i = 0; i < RUNS; i++)); do
    [[ $s == thinsnap-[1-9]* ]] && settle_spares
    a=$(ms)
    docker run --rm --network none "$IMG" /bin/busybox true >/dev/null || die "docker run on $s"
    b=$(ms)
    echo $((b - a)) >>"$W/runs"
    echo -e "$s\trun\t$((b - a))" >>"$TSV"
  done
  P50[$s]=$(pct "$W/runs" 50) P99[$s]=$(pct "$W/runs" 99)
  echo "$s: docker run --rm p50 ${P50[$s]} ms, p99 ${P99[$s]} ms ($RUNS runs)"
  : >"$W/crun" && : >"$W/cstop"
  for ((i = 0; i < COMMITS; i++)); do
    docker run -d --network none --name "b$i" "$IMG" /bin/busybox sh -c '/bin/busybox dd if=/dev/urandom of=/data/f bs=1M count=1 2>/dev/null; exec /bin/busybox sleep 100000' >/dev/null || die "run b$i"
    until docker exec "b$i" /bin/busybox test -s /data/f; do sleep 0.2; done
    a=$(ms); docker commit "b$i" "local/b$i:running" >/dev/null || die "commit of running b$i on $s"; b=$(ms)
    echo $((b - a)) >>"$W/crun"; echo -e "$s\tcommit-running\t$((b - a))" >>"$TSV"
    docker stop -t 1 "b$i" >/dev/null
    a=$(ms); docker commit "b$i" "local/b$i:stopped" >/dev/null || die "commit of stopped b$i on $s"; b=$(ms)
    echo $((b - a)) >>"$W/cstop"; echo -e "$s\tcommit-stopped\t$((b - a))" >>"$TSV"
    docker rm "b$i" >/dev/null
  done
  CRUN[$s]=$(pct "$W/crun" 50) CSTOP[$s]=$(pct "$W/cstop" 50)
  echo "$s: docker commit median: running ${CRUN[$s]} ms, stopped ${CSTOP[$s]} ms ($COMMITS each)"
  teardown
done
kill "$REG_PID" 2>/dev/null

{
  echo "Docker $V on containerd $CDV, thinsnap $("$W/bin/thinsnap" --version 2>/dev/null), kernel $(uname -r), $(nproc) vCPUs (software emulation)."
  echo "\`docker run --rm --network none\` of a small busybox image, $RUNS runs after $WARM unmeasured (with spares on, each run starts once the refiller has settled, its ready count unchanged for a second: the refiller's own time is not in the figure); \`docker commit\` (default pause) of a running container with a 1 MiB file against the same commit after \`docker stop\`, median of $COMMITS."
  echo
  echo "| storage | run p50 (ms) | run p99 (ms) | commit running, median (ms) | commit stopped, median (ms) |"
  echo "|---|---|---|---|---|"
  for s in "${STORAGES[@]}"; do
    name=$s
    [[ $s == thinsnap-0 ]] && name="thinsnap, spares off"
    [[ $s == thinsnap-[1-9]* ]] && name="thinsnap, spares ${s#thinsnap-}"
    [[ $s == overlayfs ]] && name="containerd overlayfs"
    echo "| $name | ${P50[$s]} | ${P99[$s]} | ${CRUN[$s]} | ${CSTOP[$s]} |"
  done
} | tee "$OUT/docker-bench.md"
exit 0
}
