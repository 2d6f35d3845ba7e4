#!/bin/bash
# Shared by the scripts that run inside the VM. Source it, then call guest_prelude.
# Needs VM_RESULTS and GUEST_REPO (set by entry.sh).

: "${VM_RESULTS:?run inside the VM via integration/vm.sh}"
: "${GUEST_REPO:?run inside the VM via integration/vm.sh}"

say() { printf '\n==== %s\n' "$*"; }
fail_loudly() {
  printf '\n!!!!!!!! GUEST SETUP FAILED: %s !!!!!!!!\n\n' "$*" >&2
  exit 1
}

# Makes the guest fit for dm-thin tests. Idempotent (a marker file keeps it from running twice).
guest_prelude() {
  [[ -e /run/thinsnap-guest-prelude ]] && return 0
  say "guest prelude: kernel $(uname -r), $(nproc) vCPUs, $(awk '/MemTotal/ {print int($2/1024) " MiB"}' /proc/meminfo)"

  modprobe loop || fail_loudly "modprobe loop"
  modprobe dm-mod 2>/dev/null || true
  modprobe dm-thin-pool || fail_loudly "modprobe dm-thin-pool (kernel $(uname -r) without dm modules?)"
  modprobe dm-snapshot 2>/dev/null || echo "note: dm-snapshot module not available"
  if [[ ! -c /dev/mapper/control ]]; then
    # Without udev/devtmpfs the control node may be missing; dmsetup can create it.
    dmsetup mknodes >/dev/null 2>&1 || true
  fi
  [[ -c /dev/mapper/control ]] || fail_loudly "/dev/mapper/control does not exist after modprobe dm-thin-pool"
  grep -qw device-mapper /proc/misc || fail_loudly "device-mapper missing from /proc/misc"
  grep -qw thin-pool < <(dmsetup targets 2>/dev/null) || fail_loudly "dm target thin-pool not registered"

  if ! grep -q '^cgroup2 /sys/fs/cgroup ' /proc/mounts; then
    mount -t cgroup2 cgroup2 /sys/fs/cgroup || fail_loudly "cannot mount cgroup2 on /sys/fs/cgroup"
  fi

  # A plain tmpfs on /tmp (virtme gives an overlay of the host's /tmp over a small /run tmpfs):
  # the pools' sparse loop files and the suites' scratch dirs live here.
  mount -t tmpfs -o "mode=1777,size=${GUEST_TMP_SIZE:-4G}" thinsnap-tmp /tmp || fail_loudly "cannot mount tmpfs on /tmp"

  # Loop devices: the kernel creates a few; make sure losetup -f can always find more.
  [[ -c /dev/loop-control ]] || fail_loudly "/dev/loop-control missing"

  if [[ ${GUEST_UDEV:-0} == 1 ]]; then
    # Optional: a udev daemon as on a real host (creates /dev/mapper/* symlinks, runs dm rules).
    if [[ -x /lib/systemd/systemd-udevd ]]; then
      /lib/systemd/systemd-udevd --daemon && echo "udevd started"
    else
      echo "note: GUEST_UDEV=1 but systemd-udevd not found"
    fi
  fi

  ulimit -n 65536 2>/dev/null || true
  touch /run/thinsnap-guest-prelude
  echo "prelude ok: loop, dm-thin-pool, /dev/mapper/control, cgroup2, tmpfs /tmp"
}

# Prints the last "N passed, N failed" line of a log file as "N N", or nothing.
counts_from_log() {
  sed -n 's/^\([0-9][0-9]*\) passed, \([0-9][0-9]*\) failed$/\1 \2/p' "$1" | tail -n1
}
