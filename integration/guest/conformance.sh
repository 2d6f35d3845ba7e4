#!/bin/bash
# Inside the VM: runs containerd's snapshotter conformance suite against thinsnap.
#   conformance.sh [EXTRA GO TEST FLAGS...]      e.g. -test.run 'TestThinsnapConformance/Basic$'
# Environment: THINSNAP_BIN (default target/debug/thinsnap of the repo; CONFORMANCE_THINSNAP_BIN
# overrides it for this part), CONFORMANCE_BIN,
# CONFORMANCE_PARALLEL (default 2), CONFORMANCE_TIMEOUT (go duration, default 45m or what is
# left of all.sh's budget for this part),
# CONFORMANCE_FS (ext4|xfs). Ends with "N passed, N failed" counting the suite's subtests.
set -uo pipefail
# shellcheck source=lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
guest_prelude

bin=${CONFORMANCE_BIN:-$GUEST_REPO/integration/conformance/bin/conformance.test}
# CONFORMANCE_THINSNAP_BIN: another thinsnap for this part only (integration/test.sh with
# CONFORMANCE_RELEASE=1 passes the release build: issue 24 saw its subtests fail where the debug
# build's passed).
export THINSNAP_BIN=${CONFORMANCE_THINSNAP_BIN:-${THINSNAP_BIN:-$GUEST_REPO/target/debug/thinsnap}}
parallel=${CONFORMANCE_PARALLEL:-2}
gotimeout=${CONFORMANCE_TIMEOUT:-45m}
if [[ -z ${CONFORMANCE_TIMEOUT:-} && -n ${PART_DEADLINE:-} ]]; then
  # within all.sh's budget for this part, so go test panics with its goroutine dump first
  left=$((PART_DEADLINE - $(date +%s) - 60))
  ((left < 45 * 60)) && gotimeout=$((left > 60 ? left : 60))s
fi
for f in "$bin" "$THINSNAP_BIN"; do
  if [[ ! -x $f ]]; then
    echo "conformance: not found or not executable: $f" >&2
    echo "0 passed, 1 failed"
    exit 1
  fi
done

# thinsnap logs go to the guest's tmpfs while running (the results dir is a synchronous 9p mount)
# and are copied to the results dir afterwards.
export CONFORMANCE_LOGDIR=/tmp/conformance-logs
rm -rf "$CONFORMANCE_LOGDIR" && mkdir -p "$CONFORMANCE_LOGDIR"
log=$VM_RESULTS/conformance.log

say "conformance suite: $(basename "$bin") -test.parallel=$parallel, thinsnap $THINSNAP_BIN, fs ${CONFORMANCE_FS:-ext4}"
start=$(date +%s)
(cd /tmp && "$bin" -test.root -test.v -test.parallel="$parallel" -test.timeout="$gotimeout" "$@") 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
secs=$(($(date +%s) - start))
rm -rf "$VM_RESULTS/conformance-logs"
cp -r "$CONFORMANCE_LOGDIR" "$VM_RESULTS/conformance-logs" 2>/dev/null || true

# go test -v: "    --- PASS: TestThinsnapConformance/Basic (12.34s)"
mapfile -t passed < <(sed -n 's/^ *--- PASS: \(TestThinsnapConformance\/[^ ]*\) (.*/\1/p' "$log")
mapfile -t failed < <(sed -n 's/^ *--- FAIL: \(TestThinsnapConformance\/[^ ]*\) (.*/\1/p' "$log")
mapfile -t skipped < <(sed -n 's/^ *--- SKIP: \(TestThinsnapConformance\/[^ ]*\) (.*/\1/p' "$log")
npass=${#passed[@]} nfail=${#failed[@]}
note=""
if ((status != 0 && nfail == 0)); then
  nfail=1
  note="the suite binary exited with status $status without a failed subtest (panic, timeout or top-level failure; see $log)"
elif ((npass + nfail == 0)); then
  nfail=1
  note="no subtest ran (skipped? see $log)"
fi

say "conformance summary: status $status, ${secs}s wall time in the VM (-test.parallel=$parallel)"
for t in "${failed[@]}"; do
  echo "  FAILED ${t#TestThinsnapConformance/}"
  # its first error lines (go test -v streams each test's output under "=== RUN/CONT NAME")
  awk -v want="$t" '
    /^=== (RUN|CONT|PAUSE|NAME) / { cur = $3; next }
    cur == want && /^ +[A-Za-z0-9_]+\.go:[0-9]+: / && !/thinsnap instance|: unmount |level=|\.go:[0-9]+: [-a-zA-Z][-a-zA-Z][-a-zA-Z][-a-zA-Z][-a-zA-Z][-a-zA-Z][-a-zA-Z][-a-zA-Z][-a-zA-Z][-a-zA-Z] +[0-9]+ \// { print; if (++n >= 4) exit }
  ' "$log" | cut -c1-400 | sed 's/^ */      /'
done
for t in "${skipped[@]}"; do echo "  skipped ${t#TestThinsnapConformance/}"; done
[[ -n $note ]] && echo "  $note"
echo "  thinsnap logs: $VM_RESULTS/conformance-logs/"
echo "$npass passed, $nfail failed"
((nfail == 0))
