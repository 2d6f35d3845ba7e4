#!/bin/bash
# Inside the VM: runs the cargo test executables' root-only tests (those marked #[ignore]) on real
# device-mapper:   rust-root-tests.sh [LIST_FILE]
# LIST_FILE has one test executable per line (default: $VM_RESULTS/rust-test-executables.txt,
# written by integration/test.sh from `cargo test --no-run --message-format=json`).
# Each executable runs with `--ignored --test-threads=1`. Ends with "N passed, N failed"
# counting individual tests (an executable that dies without a result line counts as 1 failed).
set -uo pipefail
# shellcheck source=lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
guest_prelude

list=${1:-$VM_RESULTS/rust-test-executables.txt}
per_exe_timeout=${RUST_ROOT_TEST_TIMEOUT:-2700}
if [[ ! -r $list ]]; then
  echo "rust-root-tests: list of test executables not found: $list" >&2
  echo "0 passed, 1 failed"
  exit 1
fi
mapfile -t exes < <(grep -v '^[[:space:]]*\(#\|$\)' "$list")
if ((${#exes[@]} == 0)); then
  echo "rust-root-tests: $list lists no test executables" >&2
  echo "0 passed, 1 failed"
  exit 1
fi

# The crash tests (tests/vm_crash.rs: SIGKILL at every failpoint, random SIGKILLs under load) are
# part of the gate. RUN_CRASH_TESTS=0 leaves them out of a quick local run, and says so.
if [[ ${RUN_CRASH_TESTS:-1} == 0 ]]; then
  kept=()
  for exe in "${exes[@]}"; do
    case ${exe##*/} in
      vm_crash-*) echo "rust-root-tests: NOT RUN: ${exe##*/} (crash tests; RUN_CRASH_TESTS=0 was given)" ;;
      *) kept+=("$exe") ;;
    esac
  done
  exes=("${kept[@]}")
fi

export RUST_BACKTRACE=${RUST_BACKTRACE:-1} TMPDIR=/tmp
total_pass=0 total_fail=0
summary=() failures=()
cd "$GUEST_REPO" || exit 1
for exe in "${exes[@]}"; do
  name=${exe##*/}
  say "rust root tests: $name --ignored --test-threads=1"
  if [[ ! -x $exe ]]; then
    echo "rust-root-tests: not executable: $exe"
    summary+=("$(printf '%-40s MISSING' "$name")")
    failures+=("$name: executable missing")
    ((total_fail++))
    continue
  fi
  log=$VM_RESULTS/rust-$name.log
  start=$(date +%s)
  timeout --kill-after=10 "$per_exe_timeout" "$exe" --ignored --test-threads=1 2>&1 | tee "$log"
  status=${PIPESTATUS[0]}
  secs=$(($(date +%s) - start))
  # libtest prints "test result: ok. 3 passed; 0 failed; 0 ignored; 0 measured; 5 filtered out; ..."
  read -r p f < <(sed -n 's/^test result: [A-Za-z]*\. \([0-9]*\) passed; \([0-9]*\) failed;.*/\1 \2/p' "$log" | tail -n1)
  if [[ -z ${p:-} ]]; then
    p=0 f=1
    failures+=("$name: exited with status $status without a test result line (crash or timeout after ${per_exe_timeout}s?)")
  elif ((status != 0 && f == 0)); then
    f=1
    failures+=("$name: exited with status $status although all its tests passed")
  fi
  while read -r t; do failures+=("$name: $t"); done < <(sed -n 's/^test \(.*\) \.\.\. FAILED$/\1/p' "$log")
  ((total_pass += p, total_fail += f))
  summary+=("$(printf '%-40s %3d passed, %3d failed  (status %d, %ds)' "$name" "$p" "$f" "$status" "$secs")")
  unset p f
done

say "rust root tests summary"
printf '  %s\n' "${summary[@]}"
if ((${#failures[@]})); then
  echo "  failures:"
  printf '    %s\n' "${failures[@]}"
fi
echo "$total_pass passed, $total_fail failed"
((total_fail == 0))
