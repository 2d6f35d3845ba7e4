#!/usr/bin/env bash
# Checks that a Rust toolchain new enough for thinsnap is on PATH (Cargo.toml's rust-version),
# and says exactly how to get one when it is not. Used by run.sh and integration/install-deps.sh.
#
#   integration/check-toolchain.sh      exit 0 if cargo and rustc are there and new enough
#
# Debian 12's own rustc (1.63) is older than thinsnap's rust-version, so the toolchain comes from
# rustup, not apt.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
export PATH="$HOME/.cargo/bin:$PATH"
want=$(sed -n 's/^rust-version *= *"\([0-9.]*\)".*/\1/p' "$here/Cargo.toml" | head -n1)
[[ -n $want ]] || { echo "check-toolchain: no rust-version in $here/Cargo.toml" >&2; exit 2; }
how="install a toolchain with rustup (as the user who builds):
    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal
    . \"\$HOME/.cargo/env\"
  or, where rustup is already installed:  rustup toolchain install stable && rustup default stable"
if ! command -v cargo >/dev/null 2>&1 || ! command -v rustc >/dev/null 2>&1; then
  echo "check-toolchain: cargo/rustc not found (looked in PATH and ~/.cargo/bin); thinsnap needs Rust >= $want;" >&2
  echo "  $how" >&2
  exit 1
fi
have=$(rustc --version | awk '{print $2}')
have=${have%%-*}
if [[ $(printf '%s\n%s\n' "$want" "$have" | sort -V | head -n1) != "$want" ]]; then
  echo "check-toolchain: rustc $have ($(command -v rustc)) is older than thinsnap's rust-version $want;" >&2
  echo "  $how" >&2
  exit 1
fi
echo "check-toolchain: rustc $have >= $want"
