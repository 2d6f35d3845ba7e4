#!/usr/bin/env bash
# Checks the maintainer scripts of thinsnap's Debian package where systemd is absent (the build
# machine, CI): runs them in the order dpkg does for an install, an upgrade and a removal, with
# `systemctl`, `deb-systemd-invoke` and `deb-systemd-helper` replaced by stubs that record their
# arguments, and "systemd is running" (`/run/systemd/system`) pointed at a directory of the test's.
#
#   integration/deb-scripts-test.sh PACKAGE.deb
#
# What it asserts (deploy/README.md, "Upgrading"):
#   - install: the unit is enabled, never started (the pool is sized in the config first);
#   - upgrade: the old prerm does not stop thinsnap; the new postinst try-restarts it (restarts it
#     only if it was running), and nothing else stops or starts it. A restart leaves running
#     containers alone: their dm devices stay active and mounted (integration/e2e/run-guest.sh,
#     "restart thinsnap while a container runs", on every containerd of the matrix);
#   - remove: thinsnap is stopped; the pool and its devices are left alone (no script calls
#     thinsnap, dmsetup or losetup);
#   - the packaged binary has no failpoints: it ignores THINSNAP_FAILPOINT and says so.
# Ends with "N passed, N failed".
set -uo pipefail
deb=${1:?usage: deb-scripts-test.sh PACKAGE.deb}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
dpkg-deb -e "$deb" "$work/ctl" || { echo "cannot read the control part of $deb"; echo "0 passed, 1 failed"; exit 1; }

mkdir -p "$work/bin" "$work/systemd-running"
for tool in systemctl deb-systemd-invoke deb-systemd-helper thinsnap dmsetup losetup; do
  printf '#!/bin/sh\necho "%s $*" >>"%s/calls"\n' "$tool" "$work" >"$work/bin/$tool"
  chmod +x "$work/bin/$tool"
done
# The scripts call the helpers by name (and test -x /usr/bin/deb-systemd-helper before some).
for s in preinst postinst prerm postrm; do
  [[ -f $work/ctl/$s ]] || continue
  sed -e "s#/run/systemd/system#$work/systemd-running#g" \
    -e "s#/usr/bin/deb-systemd-helper#$work/bin/deb-systemd-helper#g" "$work/ctl/$s" >"$work/$s"
done

pass=0 fail=0
check() { # check WHAT COND...
  local what=$1
  shift
  if "$@"; then
    echo "PASS: $what"
    pass=$((pass + 1))
  else
    echo "FAIL: $what"
    sed 's/^/    call: /' "$work/calls" 2>/dev/null
    fail=$((fail + 1))
  fi
}
# run SCRIPT ARGS...: runs one maintainer script as dpkg would (if the package has it)
run() {
  local s=$1
  shift
  [[ -f $work/$s ]] || return 0
  PATH="$work/bin:/usr/bin:/bin" DPKG_MAINTSCRIPT_PACKAGE=thinsnap sh -e "$work/$s" "$@"
}
calls() { cat "$work/calls" 2>/dev/null; }
called() { calls | grep -qE "$1"; }
not_called() { ! calls | grep -qE "$1"; }

version=$(dpkg-deb -f "$deb" Version)

# A fresh install: preinst install; postinst configure (no old version).
: >"$work/calls"
run preinst install && run postinst configure ""
check "install enables the unit" called '^deb-systemd-helper enable thinsnap.service'
check "install does not start thinsnap" not_called '(start|restart) thinsnap'
check "install touches no device" not_called '^(thinsnap|dmsetup|losetup) '

# An upgrade from an older version: old prerm upgrade NEW; new preinst upgrade OLD;
# old postrm upgrade NEW; new postinst configure OLD.
: >"$work/calls"
run prerm upgrade "$version" && run preinst upgrade 0.0.1 && run postrm upgrade "$version" &&
  run postinst configure 0.0.1
check "upgrade does not stop thinsnap before the files change" not_called '(stop) thinsnap'
check "upgrade try-restarts thinsnap (only if it was running)" called '^deb-systemd-invoke try-restart thinsnap.service'
check "upgrade neither starts nor plain-restarts thinsnap" not_called '(invoke|systemctl) (start|restart) thinsnap'
check "upgrade touches no device" not_called '^(thinsnap|dmsetup|losetup) '

# A removal: prerm remove; postrm remove.
: >"$work/calls"
run prerm remove && run postrm remove
check "remove stops thinsnap" called 'stop thinsnap.service'
check "remove touches no device" not_called '^(thinsnap|dmsetup|losetup) '

# The packaged binary is the product: it has no failpoints and says that it ignores
# THINSNAP_FAILPOINT (it stops right after, at the config file that does not exist).
dpkg-deb -x "$deb" "$work/root"
out=$(THINSNAP_FAILPOINT=prepare:start "$work/root/usr/bin/thinsnap" serve --config "$work/no-such-config.toml" 2>&1)
check "the packaged binary ignores THINSNAP_FAILPOINT" grep -q "THINSNAP_FAILPOINT is ignored" <<<"$out"

echo "$pass passed, $fail failed"
((fail == 0))
