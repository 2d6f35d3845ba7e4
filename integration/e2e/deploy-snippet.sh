#!/bin/bash
# Prints a deploy/ containerd snippet with thinsnap's socket and root replaced by a test's:
#   deploy-snippet.sh SNIPPET SOCKET ROOT
# The snippet is the source: only the two literal defaults "/run/thinsnap/thinsnap.sock" and
# "/var/lib/thinsnap" change (the test's thinsnap listens and keeps its pool under the guest's
# /tmp). Fails if either is missing from the snippet, or if anything but those two strings differs
# (checked by substituting back).
set -euo pipefail
snippet=$1 sock=$2 root=$3
grep -q '"/run/thinsnap/thinsnap.sock"' "$snippet" || { echo "deploy-snippet: $snippet has no \"/run/thinsnap/thinsnap.sock\"" >&2; exit 1; }
grep -q '"/var/lib/thinsnap"' "$snippet" || { echo "deploy-snippet: $snippet has no \"/var/lib/thinsnap\"" >&2; exit 1; }
out=$(sed -e "s#\"/run/thinsnap/thinsnap.sock\"#\"$sock\"#g" -e "s#\"/var/lib/thinsnap\"#\"$root\"#g" "$snippet")
back=$(sed -e "s#\"$sock\"#\"/run/thinsnap/thinsnap.sock\"#g" -e "s#\"$root\"#\"/var/lib/thinsnap\"#g" <<<"$out")
[[ $back == "$(cat "$snippet")" ]] || { echo "deploy-snippet: substitution changed more than the socket and root" >&2; exit 1; }
printf '%s\n' "$out"
