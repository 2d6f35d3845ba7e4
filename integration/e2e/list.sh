# Prints a canonical listing of a root filesystem's /bin, /etc and /data: one line per path, sorted,
# then hard-link groups and user.* xattrs. Plain busybox sh, no bashisms: it runs inside the test
# containers (`sh -c "$(cat list.sh)" list /`) and on the host over a reference rootfs
# (`busybox sh list.sh ROOT`), and the two outputs must be identical.
#   $1    root to list (default /); paths are printed relative to it, with a leading /
#   BB    busybox to use (default /bin/busybox; the test image carries a static one)
#   XATTRS  xattr dumper (default ROOT/bin/xattrs, built from xattrs.c into the image)
root=${1:-/}
root=${root%/}
BB=${BB:-/bin/busybox}
XATTRS=${XATTRS:-$root/bin/xattrs}
cd "$root/" || exit 1
$BB find ./bin ./etc ./data 2>/dev/null | $BB sort | while IFS= read -r p; do
  rel=${p#.}
  set -- $($BB stat -c '%a %u %g %h %s %Y' "$p")
  mode=$1 uid=$2 gid=$3 nlink=$4 size=$5 mtime=$6
  if [ -L "$p" ]; then
    echo "$rel|symlink|$mode|$uid:$gid|mtime=$mtime|-> $($BB readlink "$p")"
  elif [ -d "$p" ]; then
    echo "$rel|dir|$mode|$uid:$gid"
  elif [ -f "$p" ]; then
    sum=$($BB sha256sum "$p") && sum=${sum%% *}
    echo "$rel|file|$mode|$uid:$gid|size=$size|nlink=$nlink|mtime=$mtime|sha256=$sum"
  else
    echo "$rel|other:$($BB stat -c '%F' "$p")|$mode|$uid:$gid"
  fi
done
# hard links: files sharing an inode, as one line per group
$BB find ./bin ./etc ./data -type f -links +1 2>/dev/null | while IFS= read -r p; do
  echo "$($BB stat -c '%i' "$p") ${p#.}"
done | $BB sort -k1,1 -k2 | $BB awk '
  $1 != ino { if (line != "") print line; ino = $1; line = "hardlinks:" }
  { line = line " " substr($0, index($0, " ") + 1) }
  END { if (line != "") print line }' | $BB sort
# user.* xattrs of every path (the helper skips other namespaces)
$BB find ./bin ./etc ./data 2>/dev/null | $BB sort | while IFS= read -r p; do
  "$XATTRS" "$p" | while IFS= read -r x; do echo "xattr: ${x#.}"; done
done
