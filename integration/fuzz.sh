#!/usr/bin/env bash
# Fuzzes thinsnap's parsers of untrusted text for a bounded time (cargo fuzz, libFuzzer):
#   fuzz_filter  containerd list filters (engine::filter): no panic; quoting round trips
#   fuzz_config  the TOML config (config::Config::parse): no panic; serialize -> parse round trip
#
#   integration/fuzz.sh                      every target, FUZZ_SECONDS each
#   FUZZ_SECONDS=600 integration/fuzz.sh fuzz_filter
#
# For each target: replays the known repros in fuzz/regressions/<target>/ (if any), then fuzzes
# for FUZZ_SECONDS starting from the committed seeds in fuzz/corpus/<target>/, with the libFuzzer
# dictionary fuzz/dict/<target>.dict if there is one (libFuzzer writes the inputs it finds to a
# scratch corpus under fuzz/target/fuzz-corpus/, never into the seeds). A crash,
# a failed assertion, an input slower than FUZZ_TIMEOUT or an out-of-memory is a failure: the
# input is printed and kept in fuzz/artifacts/<target>/. The last line is
# "fuzz: N passed, N failed"; the exit status is non-zero if anything failed.
#
# Needs: the machine's stable Rust (cargo fuzz wants nightly; RUSTC_BOOTSTRAP=1 lets stable rustc
# accept the -Z flags it passes), cargo-fuzz (installed here if missing), and the main crate's
# build dependencies (protoc, libdevmapper, libclang: integration/install-deps.sh).
# Environment:
#   FUZZ_SECONDS    fuzzing time per target (default 60)
#   FUZZ_TIMEOUT    seconds one input may take before it counts as a hang (default 30)
#   FUZZ_SANITIZER  address (default), none (faster: the parsers are safe Rust), leak, ...
#   FUZZ_ARGS       extra libFuzzer arguments, e.g. "-max_len=20000 -rss_limit_mb=4096"
#   CARGO_FUZZ_VERSION  the cargo-fuzz to install when missing (default 0.13.2)
# Build output goes to fuzz/target (never the main crate's target dir).
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
FUZZ_DIR=$REPO/fuzz
cd "$REPO" || exit 1
export PATH="$HOME/.cargo/bin:$PATH"
export CARGO_TERM_COLOR=${CARGO_TERM_COLOR:-never}
# Stable rustc refuses -Zsanitizer and friends unless told it is bootstrapping the compiler.
export RUSTC_BOOTSTRAP=1
unset CARGO_TARGET_DIR CARGO_BUILD_TARGET_DIR

FUZZ_SECONDS=${FUZZ_SECONDS:-60}
FUZZ_TIMEOUT=${FUZZ_TIMEOUT:-30}
FUZZ_SANITIZER=${FUZZ_SANITIZER:-address}
FUZZ_ARGS=${FUZZ_ARGS:-}
CARGO_FUZZ_VERSION=${CARGO_FUZZ_VERSION:-0.13.2}
TARGET_DIR=$FUZZ_DIR/target
LOGS=$TARGET_DIR/fuzz-logs
mkdir -p "$LOGS"

passed=0
failed=0
failures=()
t0=$(date +%s)
say() { printf 'fuzz.sh: %s\n' "$*"; }
pass() { passed=$((passed + 1)); say "PASS $1"; }
fail() { failed=$((failed + 1)); failures+=("$1"); say "FAIL $1"; }
summary() {
  say "done in $(($(date +%s) - t0))s"
  for f in "${failures[@]}"; do say "failed: $f"; done
  echo "fuzz: $passed passed, $failed failed"
  [ "$failed" -eq 0 ]
}

# cargo fuzz's options shared by build and run.
FUZZ_OPTS=(-O --sanitizer "$FUZZ_SANITIZER" --fuzz-dir "$FUZZ_DIR" --target-dir "$TARGET_DIR")

if ! cargo fuzz --version >/dev/null 2>&1; then
  say "installing cargo-fuzz $CARGO_FUZZ_VERSION"
  start=$(date +%s)
  if ! cargo install --locked cargo-fuzz --version "$CARGO_FUZZ_VERSION" >"$LOGS/install.log" 2>&1; then
    tail -n 30 "$LOGS/install.log"
    fail "install cargo-fuzz (log: $LOGS/install.log)"
    summary
    exit 1
  fi
  say "installed cargo-fuzz in $(($(date +%s) - start))s"
fi
say "$(cargo fuzz --version), $(rustc --version)"

if [ $# -gt 0 ]; then
  targets=("$@")
else
  mapfile -t targets < <(cargo fuzz list --fuzz-dir "$FUZZ_DIR")
fi
[ "${#targets[@]}" -gt 0 ] || { fail "no fuzz targets in $FUZZ_DIR"; summary; exit 1; }

# print_input FILE: a failing input, readable and exact.
print_input() {
  local f=$1 size
  size=$(wc -c <"$f")
  say "input $f ($size bytes); as text (cat -v, first 4096 bytes):"
  head -c 4096 "$f" | cat -v
  echo
  say "base64:"
  base64 -w 0 "$f"
  echo
}

# report LOG: the panic (message and backtrace) or the sanitizer/libFuzzer report (timeout, OOM,
# memory error) from a libFuzzer log, without the noise around it.
report() {
  say "---- the report, from $1 ----"
  awk '
    /panicked at/ && !mode { mode = "panic" }
    /ALARM: |ERROR: libFuzzer|ERROR: AddressSanitizer|==[0-9]+==ERROR|out-of-memory/ && !mode { mode = "other" }
    mode == "panic" && /ERROR: libFuzzer: deadly signal/ { exit }
    mode { print; if (/^SUMMARY:/ || ++n >= 80) exit }
  ' "$1" | grep -v '^[[:space:]]*$'
}

# artifacts TARGET MARKER: prints the inputs libFuzzer saved (newer than MARKER) for TARGET.
artifacts() {
  local target=$1 marker=$2 a found=0
  while IFS= read -r -d '' a; do
    found=1
    print_input "$a"
    say "reproduce: RUSTC_BOOTSTRAP=1 cargo fuzz run ${FUZZ_OPTS[*]} $target $a"
  done < <(find "$FUZZ_DIR/artifacts/$target" -type f -newer "$marker" ! -name 'slow-unit-*' -print0 2>/dev/null)
  [ "$found" -eq 1 ] || say "(libFuzzer saved no input; see $LOGS/$target.log)"
}

# Build every target once up front, so a build failure is reported as such.
start=$(date +%s)
say "building ${targets[*]} (sanitizer: $FUZZ_SANITIZER)"
build_ok=1
for target in "${targets[@]}"; do
  if ! cargo fuzz build "${FUZZ_OPTS[@]}" "$target" >"$LOGS/build-$target.log" 2>&1; then
    grep -E '^(error|warning: unused)' -A 12 "$LOGS/build-$target.log" | head -n 60
    tail -n 15 "$LOGS/build-$target.log"
    fail "$target: build (log: $LOGS/build-$target.log)"
    build_ok=0
  fi
done
say "built in $(($(date +%s) - start))s"
[ "$build_ok" -eq 1 ] || { summary; exit 1; }

LIBFUZZER_ARGS=(-timeout="$FUZZ_TIMEOUT" -print_final_stats=1)
# shellcheck disable=SC2206 # FUZZ_ARGS is a list of words on purpose
LIBFUZZER_ARGS+=($FUZZ_ARGS)

for target in "${targets[@]}"; do
  mkdir -p "$FUZZ_DIR/artifacts/$target"

  # 1. Known repros: each must now pass.
  repros=()
  [ -d "$FUZZ_DIR/regressions/$target" ] &&
    mapfile -t repros < <(find "$FUZZ_DIR/regressions/$target" -type f ! -name '*.md' | sort)
  if [ "${#repros[@]}" -gt 0 ]; then
    say "$target: replaying ${#repros[@]} input(s) of fuzz/regressions/$target/"
    bad=()
    for r in "${repros[@]}"; do
      log=$LOGS/$target-regression-$(basename "$r").log
      if ! cargo fuzz run "${FUZZ_OPTS[@]}" "$target" "$r" -- "${LIBFUZZER_ARGS[@]}" >"$log" 2>&1; then
        say "$target: regression ${r#"$REPO"/} fails (log: $log)"
        report "$log"
        print_input "$r"
        bad+=("$(basename "$r")")
      fi
    done
    if [ "${#bad[@]}" -eq 0 ]; then
      pass "$target: ${#repros[@]} regression input(s)"
    else
      fail "$target: regression input(s) ${bad[*]}"
    fi
  fi

  # 2. Fuzz for FUZZ_SECONDS from the seeds.
  scratch=$TARGET_DIR/fuzz-corpus/$target
  mkdir -p "$scratch"
  seeds=()
  [ -d "$FUZZ_DIR/corpus/$target" ] && seeds=("$FUZZ_DIR/corpus/$target")
  dict=()
  [ -f "$FUZZ_DIR/dict/$target.dict" ] && dict=(-dict="$FUZZ_DIR/dict/$target.dict")
  log=$LOGS/$target.log
  marker=$(mktemp)
  say "$target: fuzzing for ${FUZZ_SECONDS}s (log: $log)"
  cargo fuzz run "${FUZZ_OPTS[@]}" "$target" "$scratch" "${seeds[@]}" -- \
    -max_total_time="$FUZZ_SECONDS" "${dict[@]}" "${LIBFUZZER_ARGS[@]}" >"$log" 2>&1
  rc=$?
  grep -E '^(stat::number_of_executed_units|stat::peak_rss_mb|Done [0-9]+ runs)' "$log" | sed 's/^/  /'
  if [ "$rc" -eq 0 ]; then
    pass "$target: ${FUZZ_SECONDS}s"
  else
    report "$log"
    artifacts "$target" "$marker"
    fail "$target: fuzzing (exit $rc, log: $log)"
  fi
  rm -f "$marker"
done

summary
