#!/usr/bin/env bash
# Scans a Boxwood state dir for anything that would give a local user or a later process
# privileges or data it should not have: setuid/setgid files, file capabilities, device nodes,
# FIFOs, anything group- or world-accessible (symlinks excepted: their mode means nothing),
# symlinks inside the (inert) image trees, and, given the server's pid, its QEMU processes
# (children) that run as root.
#   scripts/scan-state.sh STATE_DIR [SERVER_PID]
#   scripts/scan-state.sh --self-test      (shows on a scratch dir that each finding fails it)
# exits 0 when clean, 1 with a report otherwise.
set -euo pipefail

self_test() {
  local me=$0 scratch fails=0
  scratch=$(mktemp -d)
  trap 'rm -rf "$scratch"' RETURN
  local s=$scratch/state
  # A clean layout, as a server leaves it.
  (umask 077 && mkdir -p "$s"/{blobs/sha256/ab,images/layers,images/trees/l/bin,guest/templates/k,run} &&
    touch "$s"/boxwood.db "$s"/boxwood.db-wal "$s"/blobs/sha256/ab/abcd "$s"/images/layers/l.erofs \
      "$s"/guest/vmlinux "$s"/images/trees/l/bin/sh && ln -s /etc/passwd "$s"/link)
  expect() { # expect RC DESCRIPTION ARGS...
    local want=$1 what=$2 got=0
    shift 2
    "$me" "$@" >"$scratch/out" 2>&1 || got=$?
    if ((got == want)); then
      echo "scan-state self-test: ok   ($what: exit $got)"
    else
      echo "scan-state self-test: FAIL ($what: exit $got, want $want)"
      sed 's/^/  /' "$scratch/out"
      fails=1
    fi
  }
  expect 0 "clean state dir" "$s"
  chmod 0644 "$s/boxwood.db"
  expect 1 "world-readable boxwood.db" "$s"
  chmod 0600 "$s/boxwood.db"
  chmod 0755 "$s/blobs"
  expect 1 "world-listable blobs/" "$s"
  chmod 0700 "$s/blobs"
  chmod 0755 "$s"
  expect 1 "world-listable state dir" "$s"
  chmod 0700 "$s"
  chmod 4700 "$s/images/layers/l.erofs"
  expect 1 "setuid layer file" "$s"
  chmod 0600 "$s/images/layers/l.erofs"
  mkfifo -m 0600 "$s/run/fifo"
  expect 1 "FIFO in run/" "$s"
  rm "$s/run/fifo"
  if command -v setcap >/dev/null; then
    setcap cap_net_raw+ep "$s/guest/vmlinux"
    expect 1 "file capability on a guest asset" "$s"
    setcap -r "$s/guest/vmlinux"
    setcap cap_net_raw+ep "$s/images/trees/l/bin/sh"
    expect 1 "file capability in a tree" "$s"
    setcap -r "$s/images/trees/l/bin/sh"
  fi
  chmod 4700 "$s/images/trees/l/bin/sh"
  expect 1 "setuid file in a tree" "$s"
  chmod 0600 "$s/images/trees/l/bin/sh"
  ln -s /etc/shadow "$s/images/trees/l/bin/shadow"
  expect 1 "symlink in a tree" "$s"
  rm "$s/images/trees/l/bin/shadow"
  expect 0 "clean again" "$s"
  return "$fails"
}

case ${1:-} in
  --self-test) self_test; exit $? ;;
esac
state=${1:?usage: scan-state.sh STATE_DIR [SERVER_PID] | --self-test}
[[ -d $state ]] || { echo "scan-state: $state is not a directory" >&2; exit 2; }
state=${state%/}
bad=0
report() { echo "scan-state: $1"; sed 's/^/  /' <<<"$2" | head -n 20; }

out=$(find "$state" -perm /6000 ! -type l -printf '%M %u %p\n')
[[ -z $out ]] || { report "setuid/setgid files" "$out"; bad=1; }
out=$(find "$state" \( -type b -o -type c -o -type p \) -printf '%M %u %p\n')
[[ -z $out ]] || { report "device nodes or FIFOs" "$out"; bad=1; }
out=$(find "$state" ! -type l -perm /077 -printf '%M %u %p\n')
[[ -z $out ]] || { report "group/world-accessible entries" "$out"; bad=1; }
if [[ -d $state/images/trees ]]; then
  out=$(find "$state/images/trees" -type l -printf '%p -> %l\n')
  [[ -z $out ]] || { report "symlinks in image trees (trees are inert: a symlink is a file)" "$out"; bad=1; }
fi
if command -v getcap >/dev/null; then
  out=$(getcap -r "$state" 2>/dev/null || true)
  [[ -z $out ]] || { report "files with capabilities" "$out"; bad=1; }
fi
qemus=0
if [[ -n ${2:-} ]]; then
  procs=$(ps -eo user:20=,ppid=,pid=,comm= | awk -v p="$2" '$2 == p && $4 ~ /^qemu-system/')
  qemus=$(grep -c . <<<"$procs" || true)
  out=$(awk '$1 == "root"' <<<"$procs")
  [[ -z $out ]] || { report "QEMU processes running as root" "$out"; bad=1; }
fi
echo "scan-state: $state checked ($(find "$state" | wc -l) entries, $qemus QEMU processes of the server)"
exit "$bad"
