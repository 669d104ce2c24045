#!/usr/bin/env bash
# A long mixed load on one server with retention on (bench/soak.py): disk per persisted 1 MiB
# change along a chain and across a fan-out (target <= 1.5x), state-dir bytes per 100 runs
# before and after retention passes, server RSS start vs end, run latency during passes vs
# not. Bounded in time.
#   bench/soak.sh [RUNS=1000] [MAX_SECS=5400]      SOAK_IMAGE_DAYS (default 0.002, ~3 min)
#   SOAK_FS=xfs|btrfs: the state dir on a loop-mounted filesystem of that kind, made here
#   (reflinks: a compaction's copy_file_range shares the data it merges instead of copying
#   it); disk is then that filesystem's used bytes, which count a shared extent once.
set -euo pipefail
. "$(dirname "$0")/prepare.sh"
work=$(mktemp -d)
mnt=
cleanup() {
  if [[ -n $mnt ]]; then umount "$mnt" || umount -l "$mnt"; fi
  rm -rf "$work"
}
trap cleanup EXIT
state_parent=$work
case ${SOAK_FS:-} in
  "") ;;
  xfs | btrfs)
    package=xfsprogs
    [[ $SOAK_FS == btrfs ]] && package=btrfs-progs
    command -v "mkfs.$SOAK_FS" >/dev/null || apt-get install -y -qq "$package" >&2
    truncate -s 64G "$work/fs.img"
    if [[ $SOAK_FS == xfs ]]; then mkfs.xfs -q -m reflink=1 "$work/fs.img"; else mkfs.btrfs -q "$work/fs.img"; fi
    mnt=$work/mnt
    mkdir "$mnt"
    mount -o loop "$work/fs.img" "$mnt"
    state_parent=$mnt
    ;;
  *) echo "SOAK_FS must be xfs or btrfs" >&2; exit 2 ;;
esac
python3 bench/soak.py "$root/target/release/boxwood" "$work" "${1:-1000}" "${2:-5400}" "$state_parent"
