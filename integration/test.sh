#!/usr/bin/env bash
# The project's test command (README): run as root on a Debian 12 machine, from anywhere.
#
#   integration/test.sh
#
# 1. integration/install-deps.sh            (SKIP_INSTALL_DEPS=1 to skip)
# 2. cargo fmt --check
# 3. cargo clippy --all-targets --all-features -- -D warnings   (the benches too)
# 4. cargo test                             (unit + host tests; the VM-only ones show as ignored)
# 5. cargo build (the product) and cargo build/test --no-run --features failpoints (the crash tests'
#    binary and the list of test executables)
# 6. the Go conformance binary              (integration/conformance/build.sh)
# 7. the containerd matrix's inputs: the test images (integration/e2e/build-images.py), the CRI test
#    client (integration/cri-test), containerd 1.7/2.x and Docker Engine 26.1.5/28.5.2
#    (integration/fetch-containerd.sh), and
#    thinsnap's Debian package (cargo deb), which the VM installs and the matrix runs, and its
#    maintainer scripts' install/upgrade/remove logic (integration/deb-scripts-test.sh)
# 8. ONE VM (integration/vm.sh integration/guest/all.sh), in two lanes at once: root-only cargo
#    tests on real dm-thin, beside containerd's snapshotter conformance suite and then the
#    containerd matrix: the end-to-end test and the CRI tests on containerd 1.6.20, 1.7.24 and
#    2.1.9 (integration/e2e/matrix-guest.sh); beside them Docker Engine 26.1.5 and 28.5.2 on
#    thinsnap (integration/e2e/docker-guest.sh, one version at the end of each lane);
#    GUEST_LANES=1 runs them one after the other
# 9. a summary with the version x test table; exit status non-zero if anything failed.
#
# Steps 2-4 failing do not stop the run (so one CI run shows everything); a failed build does
# stop it before the VM. Results and logs: integration/.results/test-<date>/.
# Environment: VM_TIMEOUT (seconds, default 5400), GUEST_PARTS (e.g. "rust conformance"),
# CONFORMANCE_PARALLEL, CONFORMANCE_FS, CONFORMANCE_RELEASE (1: conformance against a release
# build), RUST_LOG; see integration/vm.sh and integration/guest/.
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
# The VM sees the host's filesystem except /tmp and /var/tmp (private to the guest): a checkout
# there is copied to a visible place and the run goes on from the copy.
case "$REPO" in /tmp/* | /var/tmp/*)
  copy=/var/lib/thinsnap-test/repo
  echo "integration/test.sh: $REPO is invisible to the VM; running from a copy in $copy"
  mkdir -p "$copy" && cp -a "$REPO/." "$copy/" || exit 1
  exec bash "$copy/integration/test.sh" "$@" ;;
esac
cd "$REPO" || exit 1
# CI may run a non-login shell: cargo (rustup) and vng (pip, maybe under pyenv) live here
export PATH="$HOME/.cargo/bin:$HOME/.pyenv/shims:$HOME/.local/bin:/usr/local/bin:$PATH"
export CARGO_TERM_COLOR=${CARGO_TERM_COLOR:-never}

RESULTS=$REPO/integration/.results/test-$(date +%Y%m%d-%H%M%S)
mkdir -p "$RESULTS"
t0=$(date +%s)
steps=()
failed=0

hms() { printf '%dm%02ds' $(($1 / 60)) $(($1 % 60)); }
# step NAME CMD...: runs CMD with its output on the terminal and in $RESULTS/NAME.log
step() {
  local name=$1 start status secs
  shift
  printf '\n######## %s: %s\n' "$name" "$*"
  start=$(date +%s)
  "$@" 2>&1 | tee "$RESULTS/$name.log"
  status=${PIPESTATUS[0]}
  secs=$(($(date +%s) - start))
  if ((status == 0)); then
    steps+=("$(printf '%-14s ok      %s' "$name" "$(hms "$secs")")")
  else
    steps+=("$(printf '%-14s FAILED  %s  (exit %d, log %s)' "$name" "$(hms "$secs")" "$status" "${RESULTS#"$REPO"/}/$name.log")")
    failed=1
  fi
  return "$status"
}
summary() {
  printf '\n######## summary (%s in total; results in %s)\n' "$(hms $(($(date +%s) - t0)))" "${RESULTS#"$REPO"/}"
  printf '  %s\n' "${steps[@]}"
  if [[ -n ${vm_line:-} ]]; then
    echo "  in the VM: $vm_line"
    [[ -s $RESULTS/vm-summary.txt ]] && cat "$RESULTS/vm-summary.txt"
  fi
  if [[ -s ${VM_RESULTS:-/nonexistent}/matrix-table.txt ]]; then
    echo "  containerd version x test (passed/failed):"
    sed 's/^/    /' "$VM_RESULTS/matrix-table.txt"
  fi
  if compgen -G "${VM_RESULTS:-/nonexistent}/docker-table-*.txt" >/dev/null; then
    echo "  Docker Engine version (passed/failed, time):"
    cat "$VM_RESULTS"/docker-table-*.txt | awk 'NR == 1 || !/^docker /' | sed 's/^/    /'
  fi
  if ((failed)); then
    echo "integration/test.sh: FAILED"
  else
    echo "integration/test.sh: all passed"
  fi
}
abort() {
  echo "integration/test.sh: $*; not starting the VM" >&2
  failed=1
  summary
  exit 1
}

if [[ ${SKIP_INSTALL_DEPS:-0} != 1 ]]; then
  step install-deps bash integration/install-deps.sh || abort "installing dependencies failed"
fi
bash integration/check-toolchain.sh || abort "no usable Rust toolchain (see the message above)"

step fmt cargo fmt --all -- --check
step clippy cargo clippy --all-targets --all-features -- -D warnings
step cargo-test cargo test

# The binaries and the list of test executables for the VM. Two builds of thinsnap: the product
# (no failpoints), which the Debian package carries and the containerd matrix runs, and the crash
# tests' (cargo feature `failpoints`), which the root-only cargo tests run (THINSNAP_BIN).
build_all() {
  local json=$RESULTS/cargo-test-no-run.json bin product
  cargo build --bins --message-format=json-render-diagnostics >"$RESULTS/cargo-build-product.json" || return 1
  product=$(grep '"reason":"compiler-artifact"' "$RESULTS/cargo-build-product.json" |
    grep '"kind":\["bin"\]' | grep '"name":"thinsnap"' |
    sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -n1)
  [[ -n $product && -x $product ]] || { echo "cannot find the product thinsnap binary in cargo's output" >&2; return 1; }
  # kept apart: the failpoints build below writes the same target/debug/thinsnap
  mkdir -p "$RESULTS/product/debug" && cp "$product" "$RESULTS/product/debug/thinsnap" || return 1
  cargo build --bins --features failpoints --message-format=json-render-diagnostics >"$RESULTS/cargo-build.json" || return 1
  bin=$(grep '"reason":"compiler-artifact"' "$RESULTS/cargo-build.json" |
    grep '"kind":\["bin"\]' | grep '"name":"thinsnap"' |
    sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -n1)
  [[ -n $bin && -x $bin ]] || { echo "cannot find the thinsnap binary in cargo's output" >&2; return 1; }
  echo "$bin" >"$RESULTS/thinsnap-bin.txt"
  cargo test --no-run --features failpoints --message-format=json-render-diagnostics >"$json" || return 1
  # test executables: compiler-artifact messages whose profile has "test":true
  grep '"reason":"compiler-artifact"' "$json" | grep -E '"profile":\{[^}]*"test":true' |
    sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | sort -u >"$RESULTS/rust-test-executables.txt"
  echo "thinsnap binary (failpoints): $bin"
  echo "thinsnap binary (product, for the package): $RESULTS/product/debug/thinsnap"
  echo "test executables:"
  sed 's/^/  /' "$RESULTS/rust-test-executables.txt"
  [[ -s $RESULTS/rust-test-executables.txt ]] || { echo "no test executables found" >&2; return 1; }
  case "$bin" in /tmp/* | /var/tmp/*)
    echo "the cargo target dir is under /tmp or /var/tmp, which the VM cannot see; set CARGO_TARGET_DIR elsewhere" >&2
    return 1 ;;
  esac
}
step build build_all || abort "building thinsnap or its tests failed"
# CONFORMANCE_RELEASE=1: the conformance part runs against a release build (the other parts keep
# the debug one). Off by default: a release build from a cold target dir did not finish in 33 min
# on a shared 2-core machine (issue 24).
if [[ ${CONFORMANCE_RELEASE:-0} == 1 ]]; then
  build_release() {
    local bin
    cargo build --release --bin thinsnap --message-format=json-render-diagnostics >"$RESULTS/cargo-build-release.json" || return 1
    bin=$(grep '"reason":"compiler-artifact"' "$RESULTS/cargo-build-release.json" |
      grep '"kind":\["bin"\]' | grep '"name":"thinsnap"' |
      sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -n1)
    [[ -n $bin && -x $bin ]] || return 1
    echo "$bin" >"$RESULTS/thinsnap-release-bin.txt"
  }
  step release-build build_release || abort "building the release thinsnap failed"
  export CONFORMANCE_THINSNAP_BIN
  CONFORMANCE_THINSNAP_BIN=$(<"$RESULTS/thinsnap-release-bin.txt")
fi
step conformance-build bash integration/conformance/build.sh || abort "building the conformance suite failed"
# The containerd matrix's inputs (integration/e2e/matrix-guest.sh); a failure here does not stop
# the VM (the matrix then reports what it could not run).
step e2e-images python3 integration/e2e/build-images.py
build_cri_test() {
  (cd integration/cri-test && cargo fmt -- --check && cargo clippy --locked -- -D warnings && cargo build --locked) || return 1
  echo "$REPO/integration/cri-test/target/debug/cri-test" >"$RESULTS/cri-test-bin.txt"
}
step cri-test-build build_cri_test
step containerd-fetch bash integration/fetch-containerd.sh
# thinsnap's Debian package (cargo deb), which the VM installs with dpkg -i and every matrix test
# then runs. Packed from the binary built above (dev profile, the one every other test runs),
# not a second release build: `cargo deb` alone makes the release package (deploy/README.md).
build_deb() {
  # (stripped: a 24 MB binary instead of 149 MB unpacks in seconds, not minutes, in the VM)
  # The product binary, without failpoints, from the target dir build_all set apart.
  CARGO_TARGET_DIR=$RESULTS/product cargo deb --no-build --profile dev --fast -o "$RESULTS/thinsnap.deb" || return 1
  dpkg-deb -c "$RESULTS/thinsnap.deb"
}
step deb build_deb
# The package's maintainer scripts on install, upgrade and removal, with systemd stubbed out
# (deploy/README.md, "Upgrading").
[[ -s $RESULTS/thinsnap.deb ]] && step deb-scripts bash integration/deb-scripts-test.sh "$RESULTS/thinsnap.deb"

export THINSNAP_BIN
THINSNAP_BIN=$(<"$RESULTS/thinsnap-bin.txt")
export VM_RESULTS=$RESULTS/vm VM_TIMEOUT=${VM_TIMEOUT:-5400}
export CRI_TEST_BIN THINSNAP_DEB
CRI_TEST_BIN=$(cat "$RESULTS/cri-test-bin.txt" 2>/dev/null)
[[ -s $RESULTS/thinsnap.deb ]] && THINSNAP_DEB=$RESULTS/thinsnap.deb
export VM_PASS_ENV="${VM_PASS_ENV:-} CONFORMANCE_PARALLEL CONFORMANCE_THINSNAP_BIN CONFORMANCE_FS CONFORMANCE_TIMEOUT RUST_ROOT_TEST_TIMEOUT GUEST_UDEV RUN_CRASH_TESTS CRASH_ROUNDS CRI_TEST_BIN THINSNAP_DEB E2E_VERSIONS E2E_FULL_VERSIONS E2E_TESTS GUEST_LANES GUEST_TMP_SIZE RUST_LATE RUST_LANE DOCKER_VERSIONS DOCKER_RUNS DOCKER_PARALLEL"
mkdir -p "$VM_RESULTS"
cp "$RESULTS/rust-test-executables.txt" "$VM_RESULTS/"
# shellcheck disable=SC2086
step vm bash integration/vm.sh integration/guest/all.sh ${GUEST_PARTS:-}
vm_line=$(grep -E '^[0-9]+ passed, [0-9]+ failed$' "$RESULTS/vm.log" | tail -n1)
[[ -n $vm_line ]] || vm_line="no result line (see ${RESULTS#"$REPO"/}/vm.log)"
if [[ -f $VM_RESULTS/exit-status ]]; then
  sed -n '/^==== SUMMARY (in the VM)/,$p' "$RESULTS/vm.log" | sed '1d;$d' | sed 's/^  /    /' >"$RESULTS/vm-summary.txt"
fi
summary
exit "$failed"
