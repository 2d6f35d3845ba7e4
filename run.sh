#!/usr/bin/env bash
# Runs thinsnap on its embedded defaults (or the arguments you pass to `serve`), after installing
# what it needs to build and run on Debian 12 (as root). See README.md.
#
#   bash run.sh                      # loop-backed pool under /var/lib/thinsnap, socket /run/thinsnap/thinsnap.sock
#   bash run.sh --config my.toml
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
export PATH="$HOME/.cargo/bin:$PATH"
bash integration/install-deps.sh --runtime
# Rust comes from rustup (Debian 12's rustc is too old): says how to get it when it is missing.
bash integration/check-toolchain.sh
cargo build --release --locked --bin thinsnap
# dm-thin must be in the kernel; load it where it is a module (a no-op where it is built in).
modprobe dm-thin-pool 2>/dev/null || true
modprobe loop 2>/dev/null || true
exec target/release/thinsnap serve "$@"
