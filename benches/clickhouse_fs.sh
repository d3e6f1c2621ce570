#!/usr/bin/env bash
# Put ClickHouse's data directory on a fresh XFS (or journaled ext4)
# filesystem, a loop-mounted image, or take it off again. For benchmarks only.
#
# Why: on a host whose root filesystem is ext4 *without* a journal (this
# project's 2-core VM: `cat /sys/fs/ext4/<dev>/journal_task` says <none>),
# every file ClickHouse creates makes ext4's inode allocator skip over the
# inodes deleted in the last minute or more (`recently_deleted()`, checked
# only without a journal), and ClickHouse creates tens of files per insert
# and per merge. perf showed 54-70 % of ClickHouse's CPU there under a 20k
# clicks/s load, and how much depends on what was deleted minutes before
# (a benchmark's own DROP DATABASE of the previous run), so runs there are
# neither representative nor repeatable (BENCHMARKS.md). BENCHMARKS.md's
# figures since session 5 are on XFS, ClickHouse's usual choice; session
# 4's journaled ext4 showed stalls of a few hundred milliseconds.
#
#   benches/clickhouse_fs.sh up [xfs|ext4]
#                                   stop ClickHouse, mount a 12 GiB image
#                                   (XFS by default, or journaled ext4) over
#                                   /var/lib/clickhouse (a copy of what is
#                                   there now), start ClickHouse
#   benches/clickhouse_fs.sh down   stop ClickHouse, unmount (the directory
#                                   underneath is as it was before `up`), start
#   benches/clickhouse_fs.sh status which filesystem holds the data, journaled or not
set -euo pipefail
cd "$(dirname "$0")/.."
dir=/var/lib/clickhouse
img=/var/lib/affgate-bench-clickhouse.img

journal() {
  local dev
  dev=$(findmnt -n -o SOURCE --target "$dir" | sed 's|^/dev/||')
  local f="/sys/fs/ext4/$dev/journal_task"
  if [ -r "$f" ]; then
    if [ "$(cat "$f")" = "<none>" ]; then echo "ext4 without a journal ($dev)"; else echo "ext4 with a journal ($dev)"; fi
  else
    echo "$(findmnt -n -o FSTYPE --target "$dir") ($dev)"
  fi
}

case "${1:-status}" in
  up)
    if mountpoint -q "$dir"; then echo "$dir is already a mount point: $(journal)"; exit 0; fi
    fs=${2:-xfs}
    case "$fs" in
      ext4) mkfs=(mkfs.ext4 -q -F) ;;
      xfs)
        command -v mkfs.xfs >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq xfsprogs >/dev/null; }
        mkfs=(mkfs.xfs -q -f) ;;
      *) echo "filesystem: xfs or ext4, not $fs" >&2; exit 2 ;;
    esac
    ./deploy/services.sh stop clickhouse
    rm -f "$img"
    truncate -s 12G "$img" && "${mkfs[@]}" "$img"
    tmp=$(mktemp -d)
    mount -o loop "$img" "$tmp"
    cp -a "$dir/." "$tmp/"
    umount "$tmp" && rmdir "$tmp"
    mount -o loop "$img" "$dir"
    ./deploy/services.sh start clickhouse >/dev/null
    echo "ClickHouse data on $(journal)"
    ;;
  down)
    mountpoint -q "$dir" || { echo "$dir is not a mount point"; exit 0; }
    ./deploy/services.sh stop clickhouse
    umount "$dir"
    rm -f "$img"
    ./deploy/services.sh start clickhouse >/dev/null
    echo "ClickHouse data back on $(journal)"
    ;;
  status) echo "ClickHouse data on $(journal)" ;;
  *) echo "usage: $0 up [xfs|ext4] | down | status" >&2; exit 2 ;;
esac
