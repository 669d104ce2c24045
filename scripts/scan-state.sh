#!/usr/bin/env bash
# Scans a Boxwood state dir for anything that would give a local user or a later process
# privileges or data it should not have: setuid/setgid files, file capabilities, device nodes,
# FIFOs, anything group- or world-accessible (symlinks excepted: their mode means nothing),
# and, given the server's pid, its QEMU processes (children) that run as root.
#   scripts/scan-state.sh [--files-advisory] STATE_DIR [SERVER_PID]
# exits 0 when clean, 1 with a report otherwise; with --files-advisory the state-dir findings
# are reported but only the process check decides (issue 10: image trees still keep live
# modes; this flag goes once they are inert).
set -euo pipefail
advisory=0
if [[ ${1:-} == --files-advisory ]]; then advisory=1; shift; fi
state=${1:?usage: scan-state.sh [--files-advisory] STATE_DIR [SERVER_PID]}
[[ -d $state ]] || { echo "scan-state: $state is not a directory" >&2; exit 2; }
bad=0
report() { echo "scan-state: $1"; sed 's/^/  /' <<<"$2" | head -n 20; bad=1; }

out=$(find "$state" -perm /6000 ! -type l -printf '%M %u %p\n')
[[ -z $out ]] || report "setuid/setgid files" "$out"
out=$(find "$state" \( -type b -o -type c -o -type p \) -printf '%M %u %p\n')
[[ -z $out ]] || report "device nodes or FIFOs" "$out"
out=$(find "$state" ! -type l -perm /077 -printf '%M %u %p\n')
[[ -z $out ]] || report "group/world-accessible entries" "$out"
if command -v getcap >/dev/null; then
  out=$(getcap -r "$state" 2>/dev/null || true)
  [[ -z $out ]] || report "files with capabilities" "$out"
fi
if ((bad && advisory)); then
  echo "scan-state: the state-dir findings above are known open (issue 10) and do not fail this scan"
  bad=0
fi
qemus=0
if [[ -n ${2:-} ]]; then
  procs=$(ps -eo user:20=,ppid=,pid=,comm= | awk -v p="$2" '$2 == p && $4 ~ /^qemu-system/')
  qemus=$(grep -c . <<<"$procs" || true)
  out=$(awk '$1 == "root"' <<<"$procs")
  [[ -z $out ]] || report "QEMU processes running as root" "$out"
fi
echo "scan-state: $state checked ($(find "$state" | wc -l) entries, $qemus QEMU processes of the server)"
exit "$bad"
