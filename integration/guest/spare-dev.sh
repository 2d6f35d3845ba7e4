#!/bin/bash
# Dev-only (not committed): issue 24 items 3, 6, 7, 8 VM tests.
set -uo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
guest_prelude
cd "$GUEST_REPO" || exit 1
export RUST_BACKTRACE=1 TMPDIR=/tmp
export THINSNAP_BIN=$GUEST_REPO/target/debug/thinsnap
edges=$(ls target/debug/deps/vm_edges-* | grep -v '\.d$' | head -1)
spares=$(ls target/debug/deps/vm_spares-* | grep -v '\.d$' | head -1)
say "vm_edges (fixed)"
start=$(date +%s)
THINSNAP_VM_ROUNDS=${EDGE_ROUNDS:-100} "$edges" --ignored --test-threads=1 --nocapture 2>&1 | tee "$VM_RESULTS/edges.log" | grep -E "^test |rounds:|test result|panicked|FAILED"
echo "vm_edges: $(( $(date +%s) - start )) s"
say "vm_spares race (fixed)"
start=$(date +%s)
THINSNAP_VM_ROUNDS=${SPARE_ROUNDS:-200} "$spares" --ignored --test-threads=1 --nocapture 2>&1 | tee "$VM_RESULTS/spares.log" | grep -E "^test |rounds:|test result|panicked|FAILED"
echo "vm_spares: $(( $(date +%s) - start )) s"
if [[ -x $VM_RESULTS/thinsnap-noretry ]]; then
  say "vm_edges item 6 with the EBUSY wait taken out"
  THINSNAP_BIN=$VM_RESULTS/thinsnap-noretry THINSNAP_VM_ROUNDS=${EDGE_ROUNDS:-100} "$edges" --ignored --test-threads=1 --nocapture vm_remove_right_after 2>&1 | tee "$VM_RESULTS/edges-noretry.log" | grep -E "^test |rounds:|test result|panicked|FAILED|round "
fi
