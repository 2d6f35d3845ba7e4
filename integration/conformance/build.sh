#!/usr/bin/env bash
# Builds the conformance test binary on the host: integration/conformance/bin/conformance.test
# GOPATH mode, offline: everything comes from Debian's golang-go (1.19) and
# golang-github-containerd-containerd-dev (containerd 1.6.20 + deps under /usr/share/gocode).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
mkdir -p "$here/bin/gopath"
[[ -d /usr/share/gocode/src/github.com/containerd/containerd/snapshots/testsuite ]] ||
  { echo "conformance/build.sh: golang-github-containerd-containerd-dev is not installed" >&2; exit 1; }
cd "$here"
export GO111MODULE=off GOPATH="$here/bin/gopath:/usr/share/gocode" GOFLAGS= GOPROXY=off
go vet .
go test -c -o bin/conformance.test .
echo "conformance/build.sh: built $here/bin/conformance.test ($(go version | cut -d' ' -f3))"
