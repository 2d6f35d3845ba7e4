#!/usr/bin/env bash
# Host entry point of the end-to-end test (see README.md beside this file):
#   integration/e2e/run.sh [thinsnap|overlayfs]
# Builds the test image on the host (build-images.py, cached), then boots the VM test bed and runs
# run-guest.sh in it. `overlayfs` runs the same container checks on containerd's built-in
# snapshotter, to validate the test itself. Exit status: the guest's (0 = all checks passed).
# Environment: THINSNAP_BIN, RUST_LOG, VM_RESULTS, VM_TIMEOUT, ... (see integration/vm.sh),
# E2E_CMD_TIMEOUT (per ctr command, default 900 s), E2E_START_TIMEOUT (thinsnap READY, 400 s).
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd -P)
export E2E_SNAPSHOTTER=${1:-${E2E_SNAPSHOTTER:-thinsnap}}
if [[ $E2E_SNAPSHOTTER == thinsnap ]]; then
  bin=${THINSNAP_BIN:-$REPO/target/debug/thinsnap}
  [[ -x $bin ]] || { echo "run.sh: no thinsnap binary at $bin (cargo build, or set THINSNAP_BIN)" >&2; exit 127; }
fi
python3 "$REPO/integration/e2e/build-images.py"
export VM_RESULTS=${VM_RESULTS:-$REPO/integration/.results/e2e-$E2E_SNAPSHOTTER-$(date +%Y%m%d-%H%M%S)}
export VM_PASS_ENV="${VM_PASS_ENV:-} E2E_SNAPSHOTTER E2E_IMAGES E2E_CMD_TIMEOUT E2E_START_TIMEOUT"
exec "$REPO/integration/vm.sh" "$REPO/integration/e2e/run-guest.sh"
