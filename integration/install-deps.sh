#!/usr/bin/env bash
# Installs everything the build and the test bed need on a fresh Debian 12 machine (run as root).
# Idempotent: a second run only checks.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

# --runtime: only what building and running thinsnap needs (run.sh), not the VM test bed.
RUNTIME_PKGS=(
  # build: the devicemapper crate links libdevmapper and runs bindgen (libclang); tonic-build needs protoc
  libdevmapper-dev libclang-dev clang pkg-config protobuf-compiler
  # run: mkfs for the base device, once per pool; thin_ls to find orphan thin ids at start
  e2fsprogs xfsprogs kmod thin-provisioning-tools
)
PKGS=(
  "${RUNTIME_PKGS[@]}"
  # the VM test bed (integration/README.md): a Debian kernel with dm modules, booted by qemu via virtme-ng
  qemu-system-x86 linux-image-amd64 kmod
  # virtme-ng comes from PyPI (below): needs python3 and pip when no other Python is installed
  python3 python3-pip
  # used inside the VM
  e2fsprogs xfsprogs thin-provisioning-tools dmsetup lvm2 util-linux
  # containerd's conformance suite and the end-to-end test
  golang-go golang-github-containerd-containerd-dev containerd runc umoci skopeo busybox-static jq
  # the containerd matrix (integration/e2e/matrix-guest.sh): a loopback registry in the VM, and apt
  # to fetch containerd 1.7/2.x from trixie/sid into a cache of its own (fetch-containerd.sh)
  docker-registry apt ca-certificates debian-archive-keyring containernetworking-plugins
)

if [[ ${1:-} == --runtime ]]; then
  PKGS=("${RUNTIME_PKGS[@]}")
fi

# cargo-deb compiles for minutes and needs nothing apt installs (gcc is on the machine): it
# builds beside apt-get instead of after it. Not for --runtime.
export PATH="$HOME/.cargo/bin:$PATH"
deb_pid=""
if [[ ${1:-} != --runtime ]] && command -v cargo >/dev/null 2>&1 && ! cargo deb --version >/dev/null 2>&1; then
  deb_log=$(mktemp)
  cargo install cargo-deb --locked --quiet >"$deb_log" 2>&1 &
  deb_pid=$!
fi

missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

export PATH="$HOME/.pyenv/shims:$HOME/.local/bin:/usr/local/bin:$PATH"
if [[ ${1:-} == --runtime ]]; then
  echo "install-deps: runtime ok"
  exit 0
fi
if ! command -v vng >/dev/null 2>&1; then
  # Debian 12's own pip refuses system-wide installs (PEP 668) unless told otherwise.
  pip install --quiet --root-user-action=ignore virtme-ng ||
    pip install --quiet --root-user-action=ignore --break-system-packages virtme-ng
fi
# containerd 1.7.24 and 2.1.9 for the version matrix: Debian's packages, fetched through an apt
# configuration of their own and unpacked with dpkg -x (the host's containerd stays 1.6.20).
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
bash "$here/fetch-containerd.sh" --check >/dev/null 2>&1 || bash "$here/fetch-containerd.sh"
# the Debian package of thinsnap (cargo deb; integration/test.sh builds it for the VM)
if [[ -n $deb_pid ]] && ! wait "$deb_pid"; then
  cat "$deb_log" >&2
  echo "install-deps: cargo install cargo-deb failed" >&2
  exit 1
fi
echo "install-deps: ok ($(ls /boot/vmlinuz-*-amd64 2>/dev/null | grep -v cloud | tail -1))"
