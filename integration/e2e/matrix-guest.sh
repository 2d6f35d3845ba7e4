#!/bin/bash
# The containerd version matrix, inside the VM (the "e2e" part of integration/guest/all.sh):
# for each containerd version, the end-to-end test (run-guest.sh) and the CRI tests
# (cri-guest.sh main, and runtime-class where containerd has per-runtime snapshotters), all
# sharing one VM boot, one loopback registry and one image build. Prints a table version x test
# with pass/fail counts and ends with the total "N passed, N failed".
#
#   integration/vm.sh integration/e2e/matrix-guest.sh
#
# Environment:
#   E2E_VERSIONS        containerd versions to run (default "1.6.20 1.7.24 2.1.9"); 1.6.20 is
#                       Debian 12's package (/usr/bin), the others come from
#                       integration/fetch-containerd.sh ($THINSNAP_TEST_CACHE/containerd/<v>)
#   E2E_FULL_VERSIONS   versions that run the full e2e scenario (default "2.1.9"; the others run
#                       the short one, to keep the whole test command within its time)
#   E2E_TESTS           tests to run per version (default "e2e cri runtime-class")
#   THINSNAP_DEB        thinsnap's Debian package: installed with dpkg -i first, then used by
#                       every test (without it: THINSNAP_BIN and deploy/thinsnap.service)
#   E2E_IMAGES, THINSNAP_BIN, CRI_TEST_BIN, RUST_LOG: see run-guest.sh and cri-guest.sh
{
set -uo pipefail
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
E2E=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
REPO=$(cd "$E2E/../.." && pwd -P)
: "${VM_RESULTS:?run inside the VM via integration/vm.sh}"
export GUEST_REPO=${GUEST_REPO:-$REPO}
# shellcheck source=../guest/lib.sh
. "$REPO/integration/guest/lib.sh"
guest_prelude

CACHE=${THINSNAP_TEST_CACHE:-/var/lib/thinsnap-test/cache}
VERSIONS=${E2E_VERSIONS:-1.6.20 1.7.24 2.1.9}
FULL=" ${E2E_FULL_VERSIONS:-2.1.9} "
TESTS=" ${E2E_TESTS:-e2e cri runtime-class} "
IMAGES=${E2E_IMAGES:-$REPO/integration/.results/e2e-images}
OUT=$VM_RESULTS/matrix
REG=/tmp/registry
REGISTRY=127.0.0.1:5000
PY=/usr/bin/python3
mkdir -p "$OUT"
T0=$(date +%s)
say() { printf '\n######## %s  (+%ss)\n' "$*" "$(($(date +%s) - T0))"; }
setup_fail=0

# ---------------------------------------------------------------- the images
if ! $PY "$E2E/build-images.py" --check "$IMAGES" >/dev/null 2>&1; then
  say "test images in $IMAGES missing or stale: building them in the guest (slow under emulation)"
  IMAGES=/tmp/e2e-images
  mkdir -p "$IMAGES"
  truncate -s 1G /tmp/e2e-images.img
  mkfs.ext4 -q -F /tmp/e2e-images.img && mount -o loop /tmp/e2e-images.img "$IMAGES" &&
    $PY "$E2E/build-images.py" "$IMAGES" || { echo "FAIL: build the test images"; setup_fail=1; }
fi
export E2E_IMAGES=$IMAGES

# ---------------------------------------------------------------- the Debian package
# THINSNAP_DEB (built by integration/test.sh with cargo deb): installed with dpkg -i as an operator
# would, then every test below starts thinsnap from the installed binary, as the installed unit's
# ExecStart= says. The guest's root filesystem is the host's, read-only: a tmpfs overlay over
# /usr, /etc and /var/lib takes the install (and vanishes with the VM). There is no systemd as
# PID 1 in the guest, so nothing starts the unit: the tests run its ExecStart= themselves.
pkg_p=0 pkg_f=0
pkg_check() { # NAME CMD...
  local name=$1 out
  shift
  if out=$("$@" 2>&1); then pkg_p=$((pkg_p + 1)); echo "PASS: $name"; else
    pkg_f=$((pkg_f + 1)); echo "FAIL: $name"; sed 's/^/      /' <<<"$out" | tail -n 15
  fi
}
if [[ -n ${THINSNAP_DEB:-} ]]; then
  say "install the Debian package $THINSNAP_DEB (dpkg -i)"
  if [[ ! -e /run/thinsnap-guest-overlays ]]; then
    for d in /usr /etc /var/lib; do
      mkdir -p "/tmp/overlay$d/upper" "/tmp/overlay$d/work"
      mount -t overlay -o "lowerdir=$d,upperdir=/tmp/overlay$d/upper,workdir=/tmp/overlay$d/work" "overlay$d" "$d" ||
        echo "cannot overlay $d"
    done
    touch /run/thinsnap-guest-overlays
  fi
  pkg_check "dpkg -i $(basename "$THINSNAP_DEB")" dpkg -i "$THINSNAP_DEB"
  pkg_check "dpkg -s thinsnap: installed" sh -c 'dpkg -s thinsnap | grep -q "^Status: install ok installed"'
  pkg_check "the package's files: /usr/bin/thinsnap, its unit, /etc/thinsnap/config.toml (conffile), the snippets" \
    sh -c 'test -x /usr/bin/thinsnap && test -f /usr/lib/systemd/system/thinsnap.service && test -f /etc/thinsnap/config.toml &&
      dpkg-query -W -f="\${Conffiles}" thinsnap | grep -q /etc/thinsnap/config.toml &&
      test -f /usr/share/doc/thinsnap/containerd-config.toml && test -f /usr/share/doc/thinsnap/containerd-config-v3.toml'
  pkg_check "the installed unit is deploy/thinsnap.service" cmp /usr/lib/systemd/system/thinsnap.service "$REPO/deploy/thinsnap.service"
  pkg_check "the installed config is deploy/config.toml" cmp /etc/thinsnap/config.toml "$REPO/deploy/config.toml"
  pkg_check "the unit is enabled (WantedBy= symlinks made by the package)" \
    sh -c 'ls -l /etc/systemd/system/*.wants/thinsnap.service'
  pkg_check "/usr/bin/thinsnap runs: thinsnap --version" /usr/bin/thinsnap --version
  export THINSNAP_BIN=/usr/bin/thinsnap THINSNAP_UNIT=/usr/lib/systemd/system/thinsnap.service
  echo "every test below runs thinsnap from the package: ExecStart= of $THINSNAP_UNIT"
  echo "package: $pkg_p passed, $pkg_f failed"
fi

# ---------------------------------------------------------------- the registry
say "loopback registry (Debian's docker-registry) on $REGISTRY, filled by skopeo"
mkdir -p "$REG/data"
cat >"$REG/config.yml" <<YML
version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: $REG/data
  delete:
    enabled: true
http:
  addr: $REGISTRY
YML
echo '{"default": [{"type": "insecureAcceptAnything"}]}' >"$REG/policy.json"
docker-registry serve "$REG/config.yml" >"$OUT/registry.log" 2>&1 &
REG_PID=$!
for _ in $(seq 120); do
  $PY -c 'import urllib.request,sys; urllib.request.urlopen("http://'$REGISTRY'/v2/", timeout=2)' 2>/dev/null && break
  sleep 0.5
done
push() { # OCI_DIR NAME:TAG
  timeout 600 skopeo --policy "$REG/policy.json" copy --quiet --dest-tls-verify=false "oci:$1:latest" "docker://$REGISTRY/$2"
}
push_all() {
  push "$IMAGES/oci" e2e-layers:latest && push "$IMAGES/small-oci" cri-small:latest || return 1
  # the pod sandbox image under the names containerd 1.6, 1.7 and 2.x default to
  # (registry.k8s.io/pause:3.6, 3.8, 3.10), served through a registry mirror (hosts.toml)
  for tag in 3.6 3.8 3.9 3.10; do push "$IMAGES/pause-oci" "pause:$tag" || return 1; done
}
if push_all; then
  echo "registry: $($PY -c 'import urllib.request,json; print(json.load(urllib.request.urlopen("http://'$REGISTRY'/v2/_catalog")))')"
else
  echo "FAIL: fill the registry with skopeo"
  setup_fail=1
fi
HOSTS=$REG/certs.d
mkdir -p "$HOSTS/registry.k8s.io" "$HOSTS/$REGISTRY"
cat >"$HOSTS/registry.k8s.io/hosts.toml" <<TOML
server = "https://registry.k8s.io"
[host."http://$REGISTRY"]
  capabilities = ["pull", "resolve"]
TOML
cat >"$HOSTS/$REGISTRY/hosts.toml" <<TOML
server = "http://$REGISTRY"
[host."http://$REGISTRY"]
  capabilities = ["pull", "resolve"]
TOML

# ---------------------------------------------------------------- the matrix
declare -A RES
total_p=0 total_f=0
# run_test VERSION TEST CMD...: runs CMD with its log in $OUT/<version>/<test>.log, records counts
run_test() {
  local v=$1 t=$2 log p f rc start left
  shift 2
  log=$OUT/$v/$t.log
  mkdir -p "$OUT/$v/$t"
  start=$(date +%s)
  left=$((${PART_DEADLINE:-${VM_DEADLINE:-$((start + 86400))}} - start - 20))
  if ((left < 120)); then
    RES[$v,$t]="not run (out of time)"
    total_f=$((total_f + 1))
    return
  fi
  say "containerd $v: $t"
  RESULTS_DIR=$OUT/$v/$t timeout --kill-after=20 "$left" "$@" 2>&1 | tee "$log"
  rc=${PIPESTATUS[0]}
  read -r p f < <(counts_from_log "$log")
  p=${p:-0} f=${f:-0}
  ((rc != 0 && f == 0)) && f=1
  total_p=$((total_p + p)) total_f=$((total_f + f))
  RES[$v,$t]="$p/$f $(($(date +%s) - start))s"
  ((rc == 124 || rc == 137)) && RES[$v,$t]+=" TIMEOUT"
}

for v in $VERSIONS; do
  if [[ $v == 1.6.20 ]]; then bin=/usr/bin; else bin=$CACHE/containerd/$v/usr/bin; fi
  got=$("$bin/containerd" --version 2>/dev/null | awk '{print $3}')
  if [[ $got != "$v"* && $got != "v$v"* ]]; then
    echo "FAIL: containerd $v at $bin (found '${got:-nothing}'; run integration/fetch-containerd.sh)"
    for t in $TESTS; do RES[$v,$t]="missing"; done
    total_f=$((total_f + 1))
    continue
  fi
  if [[ $v == 2.* ]]; then form=v3 cfg=containerd-config-v3.toml; else form=v2 cfg=containerd-config.toml; fi
  # Warm spares ([spares] count = 4) in one configuration only, so real containerd runs on them:
  # every test of containerd 2.1.9; the other versions run with spares off (`count = 0`, written
  # by run-guest.sh and cri-guest.sh; thinsnap's default is 8).
  export THINSNAP_SPARES=0
  [[ $v == 2.1.9 ]] && THINSNAP_SPARES=4
  scenario=short
  [[ $FULL == *" $v "* ]] && scenario=full
  if [[ $TESTS == *" e2e "* ]]; then
    E2E_CONTAINERD_BIN=$bin E2E_CONTAINERD_CONFIG=$cfg E2E_PULL=$REGISTRY/e2e-layers:latest \
      E2E_SCENARIO=$scenario run_test "$v" e2e /bin/bash "$E2E/run-guest.sh"
    RES[$v,e2e]+=" $scenario"
  fi
  export CRI_CONTAINERD_BIN=$bin CRI_CONFIG_FORM=$form CRI_IMAGE=$REGISTRY/cri-small:latest CRI_HOSTS_DIR=$HOSTS
  [[ $TESTS == *" cri "* ]] && run_test "$v" cri /bin/bash "$E2E/cri-guest.sh" main
  if [[ $TESTS == *" runtime-class "* ]]; then
    if [[ $v == 1.6.* ]]; then
      RES[$v,runtime-class]="n/a (1.6: no per-runtime snapshotter)"
    else
      run_test "$v" runtime-class /bin/bash "$E2E/cri-guest.sh" runtime-class
    fi
  fi
done

kill "$REG_PID" 2>/dev/null
wait "$REG_PID" 2>/dev/null
((setup_fail)) && total_f=$((total_f + 1))
total_p=$((total_p + pkg_p)) total_f=$((total_f + pkg_f))

say "containerd version x test (passed/failed, time)"
{
  printf '%-10s' containerd
  for t in $TESTS; do printf ' | %-24s' "$t"; done
  echo
  for v in $VERSIONS; do
    printf '%-10s' "$v"
    for t in $TESTS; do printf ' | %-24s' "${RES[$v,$t]:--}"; done
    echo
  done
  if [[ -n ${THINSNAP_DEB:-} ]]; then
    echo "thinsnap from the Debian package (dpkg -i): $pkg_p passed, $pkg_f failed"
  else
    echo "thinsnap: ${THINSNAP_BIN:-target/debug/thinsnap} (no THINSNAP_DEB given: the package was not tested)"
  fi
} | tee "$VM_RESULTS/matrix-table.txt"
echo
echo "matrix: $(($(date +%s) - T0))s"
echo "$total_p passed, $total_f failed"
((total_f == 0))
exit
}
