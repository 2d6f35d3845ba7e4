#!/bin/bash
# Inside the VM: the whole in-VM test run of integration/test.sh.
#   integration/vm.sh integration/guest/all.sh [PART...]
# PARTs (default: all of them, in this order):
#   rust         root-only cargo tests on real dm-thin       (guest/rust-root-tests.sh)
#   conformance  containerd's snapshotter conformance suite  (guest/conformance.sh)
#   e2e          the containerd matrix: end-to-end and CRI tests on containerd 1.6.20, 1.7.24 and
#                2.1.9 (integration/e2e/matrix-guest.sh; its table lands in matrix-table.txt)
#   docker-26    Docker Engine 26.1.5 on containerd 1.7.24 on thinsnap (ext4 pool), and
#   docker-28    Docker Engine 28.5.2 on containerd 2.1.9 (xfs pool): integration/e2e/docker-guest.sh
#                with DOCKER_VERSIONS set; each writes its row to docker-table-<version>.txt
#   docker       both versions in one part
# Each part runs in its own process, so one failing part does not stop the others. A part's
# count is the last "N passed, N failed" line it prints (or 1 passed/1 failed by its exit status
# when it prints none). The last line of the output is the total: "N passed, N failed".
#
# Lanes: the parts run in two lanes at once, "rust then docker-28" beside "conformance, e2e, then
# docker-26" (each part is
# mostly one process at a time, so one lane leaves the second vCPU idle; two lanes cut the VM's
# time by about a third). Every part names its own pools and devices, so they do not meet.
# The test executables named in RUST_LATE (default "vm_lazy vm_faults") run in the second lane,
# at its end (part "rust-late").
# GUEST_LANES=1 runs everything in one lane, in order, with the leftover-device check after each
# part; with two lanes the check runs once, after both. Explicit PARTs run in one lane.
set -uo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
# shellcheck source=lib.sh
. "$here/lib.sh"
guest_prelude

parts=("$@")
((${#parts[@]})) || parts=(rust conformance e2e docker-26 docker-28)

# Device-mapper and loop devices left over by a part (all of ours live in this VM only): a part
# that leaves any behind has leaked, and that is a failure of the part, not a warning.
leftovers() {
  local dm loops
  dm=$(dmsetup ls 2>/dev/null | grep -v '^No devices found' || true)
  loops=$(losetup -a 2>/dev/null || true)
  if [[ -n $dm || -n $loops ]]; then
    echo "FAILED: devices left behind after part '$1':"
    [[ -n $dm ]] && sed 's/^/  dm:   /' <<<"$dm"
    [[ -n $loops ]] && sed 's/^/  loop: /' <<<"$loops"
    return 1
  fi
}

lanes=${GUEST_LANES:-2}
(($# > 0)) && lanes=${GUEST_LANES:-1}
results=$VM_RESULTS/parts
rm -rf "$results" && mkdir -p "$results"
check_per_part=$((lanes == 1))

# How busy the VM's vCPUs were over the run, from /proc/stat (all CPUs: total and idle+iowait
# ticks). Under software emulation a busy vCPU is a busy host core: a third lane pays only while
# the two lanes leave the vCPUs idle, and this line says whether they do.
cpu_ticks() { awk '/^cpu / {t = 0; for (i = 2; i <= NF; i++) t += $i; print t, $5 + $6}' /proc/stat; }
read -r cpu_t0 cpu_i0 < <(cpu_ticks)

# Two lanes share the console: there each line says which part it comes from.
console() {
  if ((lanes > 1)); then sed -u "s/^/[$1] /"; else cat; fi
}

# run_part NAME CMD...: runs one part; its result ("passed failed status" and its table line)
# goes to $results/NAME.{counts,line}, so a part run in a background lane reports like any other.
run_part() {
  local part=$1 cmd=("${@:2}") log status start secs counts p f
  log=$VM_RESULTS/part-$part.log
  say "PART $part: ${cmd[*]#"$GUEST_REPO"/}"
  start=$(date +%s)
  # Stop a part in time for this script to report before vm.sh's own timeout kills the VM.
  local left=$((${VM_DEADLINE:-$((start + 86400))} - start - 30))
  if ((left < 60)); then
    echo "PART $part: NOT RUN: only ${left}s left before the VM's deadline" | tee "$log"
    echo "0 1 1" >"$results/$part.counts"
    printf '%-12s not run: out of time (VM_TIMEOUT)\n' "$part" >"$results/$part.line"
    return
  fi
  PART_DEADLINE=$((start + left)) timeout --kill-after=20 "$left" "${cmd[@]}" 2>&1 | tee "$log" | console "$part"
  status=${PIPESTATUS[0]}
  secs=$(($(date +%s) - start))
  if ((status == 124 || status == 137)); then
    echo "PART $part: TIMED OUT after ${secs}s (stopped to leave time for the report; raise VM_TIMEOUT)" | tee -a "$log"
  fi
  counts=$(counts_from_log "$log")
  if [[ -n $counts ]]; then
    read -r p f <<<"$counts"
  elif ((status == 0)); then
    p=1 f=0
  else
    p=0 f=1
  fi
  ((status != 0 && f == 0)) && f=1
  local leaked=""
  if ((check_per_part)) && ! leftovers "$part" > >(tee -a "$log"); then
    leaked="  LEAKED DEVICES"
    ((f++))
    ((status == 0)) && status=1
    # Clean up so the next part starts from nothing (its own leak check stays meaningful).
    dmsetup remove_all --force >/dev/null 2>&1 || true
    losetup -D >/dev/null 2>&1 || true
  fi
  echo "$p $f $status" >"$results/$part.counts"
  printf '%-12s %4d passed, %4d failed   exit %-3d %5ds%s\n' "$part" "$p" "$f" "$status" "$secs" "$leaked" >"$results/$part.line"
}

one_part() {
  case $1 in
    rust) run_part rust "$here/rust-root-tests.sh" "${rust_list:-$VM_RESULTS/rust-test-executables.txt}" ;;
    rust-late) run_part rust-late "$here/rust-root-tests.sh" "$results/rust-late.txt" ;;
    conformance) run_part conformance "$here/conformance.sh" ;;
    docker)
      # Docker Engine on thinsnap: both versions, one registry of its own
      run_part docker /bin/bash "$GUEST_REPO/integration/e2e/docker-guest.sh"
      ;;
    docker-26) DOCKER_VERSIONS=26.1.5 run_part docker-26 /bin/bash "$GUEST_REPO/integration/e2e/docker-guest.sh" ;;
    docker-28) DOCKER_VERSIONS=28.5.2 run_part docker-28 /bin/bash "$GUEST_REPO/integration/e2e/docker-guest.sh" ;;
    e2e)
      # ---- HOOK: owned by integration/e2e/: the containerd version matrix (end-to-end and CRI
      # tests on containerd 1.6.20, 1.7.24, 2.1.9; one registry, one image build) ----
      run_part e2e /bin/bash "$GUEST_REPO/integration/e2e/matrix-guest.sh"
      ;;
    *)
      echo "all.sh: unknown part '$1'" >&2
      echo "0 1 1" >"$results/$1.counts"
      printf '%-12s unknown part\n' "$1" >"$results/$1.line"
      ;;
  esac
}

if ((lanes > 1)) && [[ " ${parts[*]} " == *" rust "* ]] && ((${#parts[@]} > 1)); then
  # Balance the lanes: the test executables named in RUST_LATE run as part "rust-late" at the end
  # of the second lane. Measured in the run of 2026-12-07 (minutes, two lanes): rust 52.9 then
  # docker-28 19.1 (72.0) against conformance 7.5, e2e 30.6, docker-26 23.1 and vm_lazy 3.2
  # (64.4); on 2026-12-08 one test at a time in a VM of its own: vm_crash 31 (partly beside a
  # Docker VM; the every-failpoint test 20.6 of it), vm_lvm 6, vm_pool_ops over 3.1, vm_faults
  # 2.8, vm_lazy 2.4, vm_edges 2.4, vm_dm 2.4, vm_ownership 2.1. Moving vm_faults too evens the
  # lanes out (run of 2026-12-08: 50.4 and 49.8 min); vm_lvm would tip them the other way. A
  # third lane would not help: conformance alone (two tests at once) kept qemu at 150-190% of the
  # 2-core machine, so the emulated vCPUs are the bottleneck (the summary's "vcpus" line says how
  # busy they were over a whole run). RUST_LATE=none keeps every executable in the rust part.
  rust_list=$results/rust.txt
  late_pattern=$(printf '%s-|' ${RUST_LATE:-vm_lazy vm_faults})
  grep -v '^[[:space:]]*\(#\|$\)' "$VM_RESULTS/rust-test-executables.txt" | grep -Ev "/(${late_pattern%|})[^/]*$" >"$rust_list"
  grep -v '^[[:space:]]*\(#\|$\)' "$VM_RESULTS/rust-test-executables.txt" | grep -E "/(${late_pattern%|})[^/]*$" >"$results/rust-late.txt"
  [[ -s $results/rust-late.txt ]] && parts+=(rust-late)
  # The parts named in RUST_LANE (default docker-28) follow rust in its lane; the others run in
  # the second lane, in order (docker-26 after e2e): one Docker version per lane. Measured in
  # the run of 2026-12-07 (minutes): rust 30.4, docker-26 19, docker-28 13, conformance 4.2,
  # e2e 17.5, vm_lazy 2.8; rust with docker-26 made one lane 49 min against 38, this way both
  # are about 43.
  rust_lane_parts=" rust ${RUST_LANE-docker-28} "
  others=() firsts=()
  for part in "${parts[@]}"; do
    if [[ $rust_lane_parts == *" $part "* ]]; then firsts+=("$part"); else others+=("$part"); fi
  done
  say "two lanes: ${firsts[*]} | ${others[*]}"
  (for part in "${firsts[@]}"; do one_part "$part"; done) &
  rust_lane=$!
  for part in "${others[@]}"; do
    one_part "$part"
  done
  wait "$rust_lane"
else
  check_per_part=1
  for part in "${parts[@]}"; do
    one_part "$part"
  done
fi

total_pass=0 total_fail=0 any_status=0
table=()
for part in "${parts[@]}"; do
  if [[ -s $results/$part.counts ]]; then
    read -r p f status <"$results/$part.counts"
  else
    p=0 f=1 status=1
    echo "no result" >"$results/$part.line"
  fi
  ((total_pass += p, total_fail += f))
  ((status != 0)) && any_status=1
  table+=("$(<"$results/$part.line")")
done
if ((!check_per_part)) && ! leftovers "all lanes"; then
  table+=("$(printf '%-12s FAILED: devices left behind (listed above)' leftovers)")
  ((total_fail++))
  any_status=1
fi

# The kernel log: saved whole, and its alarming lines shown (OOM kills, BUGs, hung tasks, dm errors).
dmesg >"$VM_RESULTS/dmesg.txt" 2>&1
# Expected lines, counted and listed, not failed:
# - "device-mapper: thin: Deletion of thin device N failed." is the kernel's answer to thinsnap's
#   idempotent delete of a thin id that is already gone (or was never made: recovery undoing a
#   Prepare killed before its create_snap; the crash tests do this on purpose). thinsnap treats
#   it as done (ENODATA).
# - "switching pool to read-only mode" / "to write mode" and "unable to service pool target
#   messages in READ_ONLY or FAIL mode": tests/vm_faults.rs loads a pool read-only on purpose
#   (vm_a_read_only_pool_refuses_changes_clearly_and_loses_nothing). The kernel names the pool
#   by major:minor, so these cannot be told apart by name; a real metadata failure also logs
#   its own error lines, which still fail the run.
# - "thin: Couldn't open thin internal device (-ENODATA)" followed at once by "ioctl: error adding
#   target to table": activation used as a probe of a thin id the pool does not have (recovery
#   settling a Prepare killed before its create_snap; a snapshot whose thin id was deleted behind
#   thinsnap's back, which is then quarantined). Only that pair: an "error adding target" after
#   anything else still fails the run.
expected='device-mapper: (thin: (Deletion of thin device [0-9]+ failed\.|[0-9]+:[0-9]+: (switching pool to (read-only|write) mode|unable to service pool target messages in READ_ONLY or FAIL mode))|table: [0-9]+:[0-9]+: thin: Couldn.t open thin internal device \(-ENODATA\)|ioctl: error adding target to table ?\(after ENODATA\))'
# The probe's second line is marked as such only when it follows the first.
awk '/thin: Couldn.t open thin internal device \(-ENODATA\)/ {print; probe = 1; next}
     probe && /device-mapper: ioctl: error adding target to table/ {print $0 " (after ENODATA)"; probe = 0; next}
     {probe = 0; print}' "$VM_RESULTS/dmesg.txt" >"$VM_RESULTS/dmesg-marked.txt"
known=$(grep -E -c "$expected" "$VM_RESULTS/dmesg-marked.txt" || true)
if ((known > 0)); then
  say "kernel log: $known expected line(s) (idempotent deletes, the read-only pool test, activation probes), not counted"
  grep -E "$expected" "$VM_RESULTS/dmesg-marked.txt" | sed 's/^/  /' | head -n 40
fi
alarms=$(grep -E -i 'out of memory|oom-kill|killed process|BUG:|WARNING:|Call Trace|blocked for more than|device-mapper: .*(error|fail)|thin.*(error|fail|needs_check|read-only|out of data)' "$VM_RESULTS/dmesg-marked.txt" | grep -E -v "$expected" | head -n 40)
if [[ -n $alarms ]]; then
  say "kernel log: alarming lines (all of it in $VM_RESULTS/dmesg.txt)"
  echo "$alarms"
  # The kernel complaining (an OOM kill, a BUG, a thin pool error) fails the run: no test of ours
  # should make it, and one that does hides a real fault behind a passing count.
  table+=("$(printf '%-12s FAILED: alarming kernel log lines (see dmesg.txt)' kernel-log)")
  ((total_fail++))
  any_status=1
fi

read -r cpu_t1 cpu_i1 < <(cpu_ticks)
if ((cpu_t1 > cpu_t0)); then
  table+=("$(printf '%-12s %d vCPUs busy %d%% of the run (the rest idle or waiting for I/O)' vcpus "$(nproc)" $((100 - 100 * (cpu_i1 - cpu_i0) / (cpu_t1 - cpu_t0))))")
fi

say "SUMMARY (in the VM)"
printf '  %s\n' "${table[@]}"
echo "$total_pass passed, $total_fail failed"
((total_fail == 0 && any_status == 0))
