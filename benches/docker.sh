#!/usr/bin/env bash
# The Docker bench (benches/README.md, "Docker Engine"): boots ONE VM running
# benches/docker-guest.sh and puts its table into benches/RESULTS.md under "## Docker Engine"
# (replacing that section if present), with this command line.
#
#   benches/docker.sh
#
# Environment (defaults in brackets): BENCH_DOCKER_VERSION [28.5.2] (26.1.5 runs on containerd
# 1.7.24, 28.5.2 on 2.1.9; both from integration/fetch-containerd.sh), BENCH_DOCKER_RUNS [30],
# BENCH_DOCKER_WARMUP [3], BENCH_DOCKER_COMMITS [5], BENCH_SPARES [8, thinsnap's default count]; THINSNAP_BIN (default
# target/release/thinsnap, built here unless BENCH_SKIP_BUILD=1); BENCH_RESULTS (default
# benches/.results/docker-<date>); BENCH_REPORT [benches/RESULTS.md]; VM_TIMEOUT [3600].
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
cd "$REPO"
export PATH="$HOME/.cargo/bin:$HOME/.pyenv/shims:$HOME/.local/bin:/usr/local/bin:$PATH"
cmdline="benches/docker.sh"
for v in $(compgen -e | grep -E '^(BENCH_|VM_|THINSNAP_BIN)' | grep -vE '^(BENCH_RESULTS|BENCH_REPORT)$' | sort); do
  cmdline="$v=${!v} $cmdline"
done
if [[ ${BENCH_SKIP_BUILD:-0} != 1 && -z ${THINSNAP_BIN:-} ]]; then
  cargo build --release --bin thinsnap
fi
export THINSNAP_BIN=${THINSNAP_BIN:-$REPO/target/release/thinsnap}
bash integration/fetch-containerd.sh --check >/dev/null || bash integration/fetch-containerd.sh
python3 integration/e2e/build-images.py >/dev/null
export VM_RESULTS=${BENCH_RESULTS:-$REPO/benches/.results/docker-$(date +%Y%m%d-%H%M%S)}
export VM_TIMEOUT=${VM_TIMEOUT:-3600}
export VM_PASS_ENV="${VM_PASS_ENV:-} BENCH_DOCKER_VERSION BENCH_DOCKER_RUNS BENCH_DOCKER_WARMUP BENCH_DOCKER_COMMITS BENCH_SPARES"
mkdir -p "$VM_RESULTS"
bash integration/vm.sh benches/docker-guest.sh | tee "$VM_RESULTS/vm.log"
[[ -s $VM_RESULTS/docker-bench.md ]] || { echo "docker.sh: no docker-bench.md from the VM" >&2; exit 1; }
report=${BENCH_REPORT:-$REPO/benches/RESULTS.md}
section=$(printf '## Docker Engine\n\nCommand: `%s` (raw samples: `%s/docker-bench.tsv`)\n\n%s\n' \
  "$cmdline" "${VM_RESULTS#"$REPO"/}" "$(cat "$VM_RESULTS/docker-bench.md")")
python3 - "$report" "$section" <<'PY'
import re, sys
path, section = sys.argv[1], sys.argv[2]
try:
    text = open(path).read()
except FileNotFoundError:
    text = ""
pat = re.compile(r"^## Docker Engine\n.*?(?=^## |\Z)", re.S | re.M)
text = pat.sub(lambda m: section + "\n", text) if pat.search(text) else text.rstrip("\n") + "\n\n" + section + "\n"
open(path, "w").write(text)
PY
echo "docker.sh: the table is in $report (## Docker Engine)"
