#!/usr/bin/env bash
# Boots the VM test bed (see integration/README.md) and runs one script inside it.
#
#   integration/vm.sh GUEST_SCRIPT [ARGS...]
#
# The guest is a software-emulated (TCG) qemu VM started by virtme-ng on a Debian kernel that has
# the device-mapper modules. It sees the host's root filesystem read-only (so the repository, the
# cargo target dir and the tools are all there), a private tmpfs on /tmp, and one writable results
# directory shared with the host.
#
# Environment (all optional):
#   VM_RESULTS   host dir for results, shared read-write with the guest at the same path
#                (default: integration/.results/vm-<date>-<pid>); the guest sees it as $VM_RESULTS
#   VM_TIMEOUT   overall timeout in seconds, boot included (default 3600); the guest gets
#                VM_DEADLINE (epoch seconds) a minute before it, see guest/all.sh
#   VM_MEMORY    guest memory (default 6G)        VM_CPUS  guest vCPUs (default 2)
#   VM_KERNEL    kernel image (default: newest /boot/vmlinuz-*-amd64 that is not -cloud-)
#   VM_PASS_ENV  space-separated names of host variables to export in the guest
#                (RUST_LOG RUST_BACKTRACE THINSNAP_BIN are always passed when set)
#   VM_DISKS     space-separated host image files attached as disks (vng --disk), in order; the
#                guest sees them as /dev/vda, /dev/vdb, ... (default: none)
#
# Exit status: the guest script's own exit status, which the guest writes into the results dir
# (virtme-ng's own status is not trusted). 124 = timeout; 125 = the guest never reported a
# status (crash, panic, boot failure); 126/127 = bad usage or missing tools on the host.
set -uo pipefail

die() { echo "vm.sh: $*" >&2; exit 126; }

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
(($# >= 1)) || die "usage: integration/vm.sh GUEST_SCRIPT [ARGS...]"

script=$(realpath -e -- "$1" 2>/dev/null) || die "guest script not found: $1"
shift
case "$script" in
  /tmp/* | /var/tmp/*) die "guest script must not live under /tmp or /var/tmp (the guest has its own): $script" ;;
esac

command -v vng >/dev/null 2>&1 || export PATH="$PATH:$HOME/.pyenv/shims:$HOME/.local/bin:/usr/local/bin"
command -v vng >/dev/null 2>&1 || { echo "vm.sh: vng (virtme-ng) not found; run integration/install-deps.sh" >&2; exit 127; }
command -v qemu-system-x86_64 >/dev/null 2>&1 || { echo "vm.sh: qemu-system-x86_64 not found; run integration/install-deps.sh" >&2; exit 127; }

kernel=${VM_KERNEL:-}
if [[ -z $kernel ]]; then
  kernel=$(ls /boot/vmlinuz-*-amd64 2>/dev/null | grep -v -- -cloud- | sort -V | tail -n1)
fi
[[ -n $kernel && -r $kernel ]] || die "no usable kernel (install linux-image-amd64, or set VM_KERNEL)"
kver=${kernel##*/vmlinuz-}
if ! ls /lib/modules/"$kver"/kernel/drivers/md/dm-thin-pool.ko* >/dev/null 2>&1; then
  die "kernel $kver has no dm-thin-pool module under /lib/modules/$kver"
fi

results=${VM_RESULTS:-$REPO/integration/.results/vm-$(date +%Y%m%d-%H%M%S)-$$}
mkdir -p "$results" || die "cannot create $results"
results=$(cd "$results" && pwd -P)
case "$results" in
  /tmp/* | /var/tmp/*) die "VM_RESULTS must not be under /tmp or /var/tmp: $results" ;;
esac
rm -f "$results/exit-status" "$results/guest-started"

timeout_s=${VM_TIMEOUT:-3600}
[[ $timeout_s =~ ^[0-9]+$ ]] || die "VM_TIMEOUT must be a number of seconds"

# Variables for the guest: the guest does not inherit the host environment.
{
  echo "# written by integration/vm.sh"
  # Wall-clock time (epoch seconds; the guest's clock is the host's) by which the guest script
  # should be done, leaving a margin for shutdown, so it can stop its parts and still report.
  echo "export VM_DEADLINE=$(($(date +%s) + timeout_s - 60))"
  for name in RUST_LOG RUST_BACKTRACE THINSNAP_BIN ${VM_PASS_ENV:-}; do
    [[ $name =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || die "bad name in VM_PASS_ENV: $name"
    if [[ -n ${!name+set} ]]; then
      printf 'export %s=%q\n' "$name" "${!name}"
    fi
  done
} >"$results/guest.env"

# POSIX-sh single quoting: virtme-init runs the command through a shell.
shq() { local s=${1//\'/\'\\\'\'}; printf "'%s'" "$s"; }
cmd="/bin/bash $(shq "$REPO/integration/guest/entry.sh") $(shq "$results") $(shq "$script")"
for a in "$@"; do cmd+=" $(shq "$a")"; done

echo "vm.sh: kernel $kver, ${VM_CPUS:-2} vCPUs, ${VM_MEMORY:-6G}, timeout ${timeout_s}s, results $results"
echo "vm.sh: guest runs: ${script#"$REPO"/} $*"

disk_args=()
for d in ${VM_DISKS:-}; do
  [[ -f $d ]] || die "VM_DISKS: no such image file: $d"
  case "$(realpath "$d")" in
    /tmp/* | /var/tmp/*) die "VM_DISKS must not be under /tmp or /var/tmp: $d" ;;
  esac
  disk_args+=(--disk "$(realpath "$d")")
done

start=$(date +%s)
# - stdin is /dev/null: with a terminal on stdin qemu would put it into raw mode, and with no
#   stdin at all (closed fd 0, as some CI runners do) vng falls back to a mode that loses output.
# - stdout/stderr go through a pipe to tee, so they are always openable via /proc/self/fd/N
#   (vng needs that; a socket there would also trigger the lossy fallback) and a copy of the
#   console lands in the results dir.
# - timeout (not --foreground) signals the whole process group, i.e. vng and its qemu child.
timeout --kill-after=30 "$timeout_s" \
  vng --disable-kvm --force-9p -m "${VM_MEMORY:-6G}" -p "${VM_CPUS:-2}" \
    --run "$kernel" --user root \
    --rwdir "$results" "${disk_args[@]}" \
    --exec "$cmd" \
  </dev/null 2>&1 | tee "$results/console.log"
vng_status=${PIPESTATUS[0]}
elapsed=$(($(date +%s) - start))

if [[ $vng_status == 124 || $vng_status == 137 ]]; then
  echo "vm.sh: TIMEOUT: the VM did not finish within ${timeout_s}s (after ${elapsed}s; vng status $vng_status)" >&2
  exit 124
fi
if [[ ! -s $results/exit-status ]]; then
  if [[ -e $results/guest-started ]]; then
    echo "vm.sh: FAILED: the guest started the script but never reported its exit status (vng status $vng_status, ${elapsed}s); crash or kernel panic? see $results/console.log" >&2
  else
    echo "vm.sh: FAILED: the guest never started the script (vng status $vng_status, ${elapsed}s); boot failure? see $results/console.log" >&2
  fi
  exit 125
fi
status=$(<"$results/exit-status")
if [[ ! $status =~ ^[0-9]+$ ]]; then
  echo "vm.sh: FAILED: unreadable guest exit status '$status'" >&2
  exit 125
fi
echo "vm.sh: guest script exited with status $status after ${elapsed}s in the VM (boot included)"
exit "$status"
