#!/bin/bash
# Smoke test of the VM test bed itself, without thinsnap:
#   integration/vm.sh integration/guest/smoke.sh [EXIT_CODE]
# Builds a thin pool on sparse loop files with dmsetup, a thin device and a snapshot of it,
# mkfs.ext4 + mount + write + read, tears everything down, then exits with EXIT_CODE (default 0)
# so that vm.sh's status propagation can be checked too.
set -euo pipefail
# shellcheck source=lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
guest_prelude

want=${1:-0}
say "smoke: dm-thin pool on loop devices"
dir=$(mktemp -d /tmp/smoke.XXXXXX)
truncate -s 1G "$dir/data"
truncate -s 64M "$dir/meta"
data=$(losetup -f --show "$dir/data")
meta=$(losetup -f --show "$dir/meta")
dd if=/dev/zero of="$meta" bs=4096 count=1 status=none
pool=smoke-pool-$$
# 1 GiB data, 64 KiB blocks (128 sectors), low water mark 0
dmsetup create "$pool" --table "0 $((1024 * 1024 * 2)) thin-pool $meta $data 128 0"
dmsetup message "$pool" 0 "create_thin 0"
dmsetup create "$pool-t0" --table "0 $((256 * 1024 * 2)) thin /dev/mapper/$pool 0"
mkfs.ext4 -q -E nodiscard,lazy_itable_init=0,lazy_journal_init=0 "/dev/mapper/$pool-t0"
mkdir -p "$dir/mnt"
mount "/dev/mapper/$pool-t0" "$dir/mnt"
echo hello >"$dir/mnt/file"
umount "$dir/mnt"
# snapshot of the (inactive-for-writes) origin: suspend, create_snap, resume
dmsetup suspend "$pool-t0"
dmsetup message "$pool" 0 "create_snap 1 0"
dmsetup resume "$pool-t0"
dmsetup create "$pool-t1" --table "0 $((256 * 1024 * 2)) thin /dev/mapper/$pool 1"
mount "/dev/mapper/$pool-t1" "$dir/mnt"
[[ $(cat "$dir/mnt/file") == hello ]]
umount "$dir/mnt"
dmsetup status "$pool"
dmsetup remove "$pool-t1" "$pool-t0" "$pool"
losetup -d "$data" "$meta"
rm -rf "$dir"
echo "smoke: ok"
echo "1 passed, 0 failed"
exit "$want"
