#!/bin/bash
# Runs inside the VM (started by integration/vm.sh): entry.sh RESULTS_DIR SCRIPT [ARGS...]
# Sets up a sane environment, runs SCRIPT and records its exit status in RESULTS_DIR/exit-status,
# which is how the host learns the result. Not meant to be run by hand.
results=$1
script=$2
shift 2

export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root LANG=C.UTF-8 TERM=dumb
export VM_RESULTS=$results
export GUEST_REPO
GUEST_REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd -P)
# shellcheck disable=SC1091
[[ -r $results/guest.env ]] && . "$results/guest.env"
cd "$GUEST_REPO" || exit 1

date +%s >"$results/guest-started"
/bin/bash "$script" "$@"
status=$?

echo "$status" >"$results/exit-status.tmp" && mv -f "$results/exit-status.tmp" "$results/exit-status"
sync
exit "$status"
