#!/usr/bin/env bash
# Fetches the containerd versions of the test matrix that Debian 12 does not ship, WITHOUT
# touching the host's packages: Debian's containerd 1.7.24 (suite trixie) and 2.1.9 (suite sid),
# downloaded with apt-get through an apt configuration of our own (its own sources list, package
# lists and caches under the cache dir; the host's sources, lists and installed packages are never
# used or changed) and unpacked with `dpkg -x`. Both binaries run on Debian 12's libc.
#
#   integration/fetch-containerd.sh            fetch what is missing, print the directories
#   integration/fetch-containerd.sh --check    exit 0 if every version is present
#
# Result: $THINSNAP_TEST_CACHE/containerd/<version>/usr/bin/{containerd,ctr,containerd-shim-runc-v2}
# (THINSNAP_TEST_CACHE default /var/lib/thinsnap-test/cache: a place the VM sees, unlike /tmp
# and /var/cache, which the guest has of its own).
# containerd 1.6.20 is Debian 12's own package (`containerd`, installed by install-deps.sh).
#
# Docker Engine the same way (the Docker lane, integration/e2e/docker-guest.sh): 26.1.5 (trixie)
# and 28.5.2 (sid), each the packages docker.io, docker-cli and docker-buildx of that suite,
# unpacked together into $THINSNAP_TEST_CACHE/docker/<version>/ (usr/sbin/dockerd, usr/bin/docker,
# usr/libexec/docker/cli-plugins/docker-buildx). Debian 12's own docker.io (20.10) is too old
# for the containerd image store.
set -euo pipefail

CACHE=${THINSNAP_TEST_CACHE:-/var/lib/thinsnap-test/cache}
# version -> suite that holds it
declare -A SUITE=([1.7.24]=trixie [2.1.9]=sid)
# Docker Engine version -> suite (docker.io, docker-cli and docker-buildx all from that suite)
declare -A DOCKER_SUITE=([26.1.5]=trixie [28.5.2]=sid)
DOCKER_PKGS=(docker.io docker-cli docker-buildx)
MIRROR=${CONTAINERD_MIRROR:-http://deb.debian.org/debian}

have() { [[ -x $CACHE/containerd/$1/usr/bin/containerd && -x $CACHE/containerd/$1/usr/bin/ctr ]]; }
have_docker() {
  local d=$CACHE/docker/$1
  [[ -x $d/usr/sbin/dockerd && -x $d/usr/bin/docker && -x $d/usr/libexec/docker/cli-plugins/docker-buildx ]]
}

if [[ ${1:-} == --check ]]; then
  for v in "${!SUITE[@]}"; do have "$v" || { echo "containerd $v missing in $CACHE/containerd"; exit 1; }; done
  for v in "${!DOCKER_SUITE[@]}"; do have_docker "$v" || { echo "docker $v missing in $CACHE/docker"; exit 1; }; done
  exit 0
fi

missing=()
for v in "${!SUITE[@]}"; do have "$v" || missing+=("$v"); done
missing_docker=()
for v in "${!DOCKER_SUITE[@]}"; do have_docker "$v" || missing_docker+=("$v"); done
if ((${#missing[@]} + ${#missing_docker[@]})); then
  apt_dir=$CACHE/apt
  mkdir -p "$apt_dir/lists/partial" "$apt_dir/archives/partial" "$apt_dir/debs"
  suites=$(printf '%s\n' "${SUITE[@]}" "${DOCKER_SUITE[@]}" | sort -u | tr '\n' ' ')
  cat >"$apt_dir/sources.list" <<EOF
# written by integration/fetch-containerd.sh: only used with -o Dir::Etc::sourcelist=this file
$(for s in $suites; do echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $MIRROR $s main"; done)
EOF
  APT=(-o Dir::Etc::sourcelist="$apt_dir/sources.list" -o Dir::Etc::sourceparts=/nonexistent
    -o Dir::State::Lists="$apt_dir/lists" -o Dir::Cache="$apt_dir"
    -o Dir::Cache::archives="$apt_dir/archives"
    -o Dir::Cache::pkgcache="$apt_dir/pkgcache.bin" -o Dir::Cache::srcpkgcache="$apt_dir/srcpkgcache.bin"
    -o APT::Default-Release= -o Acquire::Languages=none -o Debug::NoLocking=1 -o APT::Sandbox::User=root)
  echo "fetch-containerd: apt-get update for $suites (own lists in $apt_dir)"
  apt-get "${APT[@]}" -qq update
  for v in ${missing[@]+"${missing[@]}"}; do
    # Debian's version string for upstream $v, e.g. 1.7.24~ds1-6+b4
    deb_v=$(apt-cache "${APT[@]}" madison containerd | awk -F'|' -v v="$v" '{gsub(/ /, "", $2)} index($2, v "~") == 1 || index($2, v "-") == 1 || index($2, v "+") == 1 {print $2; exit}')
    [[ -n $deb_v ]] || { echo "fetch-containerd: no containerd $v in ${SUITE[$v]} (apt-cache madison containerd):" >&2; apt-cache "${APT[@]}" madison containerd >&2; exit 1; }
    echo "fetch-containerd: containerd $v = Debian $deb_v (${SUITE[$v]})"
    (cd "$apt_dir/debs" && apt-get "${APT[@]}" -qq download "containerd=$deb_v")
    deb=$(ls "$apt_dir/debs"/containerd_"${deb_v/*:/}"_*.deb 2>/dev/null | head -n1)
    [[ -n $deb ]] || { echo "fetch-containerd: download of containerd=$deb_v left no .deb in $apt_dir/debs" >&2; exit 1; }
    rm -rf "$CACHE/containerd/$v.tmp"
    mkdir -p "$CACHE/containerd/$v.tmp"
    dpkg -x "$deb" "$CACHE/containerd/$v.tmp"
    rm -rf "$CACHE/containerd/$v"
    mv "$CACHE/containerd/$v.tmp" "$CACHE/containerd/$v"
    "$CACHE/containerd/$v/usr/bin/containerd" --version
  done
  for v in ${missing_docker[@]+"${missing_docker[@]}"}; do
    rm -rf "$CACHE/docker/$v.tmp"
    mkdir -p "$CACHE/docker/$v.tmp"
    for pkg in "${DOCKER_PKGS[@]}"; do
      # Debian's version of $pkg in the suite that holds Docker $v (docker-buildx has its own
      # version numbers: the one of that suite is taken)
      deb_v=$(apt-cache "${APT[@]}" madison "$pkg" | awk -F'|' -v s="${DOCKER_SUITE[$v]}" '{gsub(/ /, "", $2)} $3 ~ "[ /]" s "[ /]" {print $2; exit}')
      [[ -n $deb_v ]] || { echo "fetch-containerd: no $pkg in ${DOCKER_SUITE[$v]} (apt-cache madison $pkg):" >&2; apt-cache "${APT[@]}" madison "$pkg" >&2; exit 1; }
      if [[ $pkg != docker-buildx && $deb_v != "$v"* && $deb_v != *":$v"* ]]; then
        echo "fetch-containerd: $pkg in ${DOCKER_SUITE[$v]} is $deb_v, not Docker $v" >&2
        exit 1
      fi
      echo "fetch-containerd: docker $v: $pkg = Debian $deb_v (${DOCKER_SUITE[$v]})"
      (cd "$apt_dir/debs" && apt-get "${APT[@]}" -qq download "$pkg=$deb_v")
      deb=$(ls "$apt_dir/debs"/"${pkg}"_"${deb_v/*:/}"_*.deb 2>/dev/null | head -n1)
      [[ -n $deb ]] || { echo "fetch-containerd: download of $pkg=$deb_v left no .deb in $apt_dir/debs" >&2; exit 1; }
      dpkg -x "$deb" "$CACHE/docker/$v.tmp"
    done
    rm -rf "$CACHE/docker/$v"
    mv "$CACHE/docker/$v.tmp" "$CACHE/docker/$v"
    "$CACHE/docker/$v/usr/sbin/dockerd" --version
  done
fi
for v in "${!SUITE[@]}"; do
  have "$v" || { echo "fetch-containerd: containerd $v still missing" >&2; exit 1; }
  echo "containerd $v: $CACHE/containerd/$v/usr/bin ($("$CACHE/containerd/$v/usr/bin/containerd" --version | awk '{print $3}'))"
done
for v in "${!DOCKER_SUITE[@]}"; do
  have_docker "$v" || { echo "fetch-containerd: docker $v still missing" >&2; exit 1; }
  echo "docker $v: $CACHE/docker/$v ($("$CACHE/docker/$v/usr/sbin/dockerd" --version))"
done
