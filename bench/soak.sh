#!/usr/bin/env bash
# A long mixed load on one server with retention on (bench/soak.py): disk per persisted 1 MiB
# change along a chain and across a fan-out (target <= 1.5x), state-dir bytes per 100 runs
# before and after retention passes, server RSS start vs end, run latency during passes vs
# not. Bounded in time.
#   bench/soak.sh [RUNS=1000] [MAX_SECS=5400]      SOAK_IMAGE_DAYS (default 0.002, ~3 min)
set -euo pipefail
. "$(dirname "$0")/prepare.sh"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 bench/soak.py "$root/target/release/boxwood" "$work" "${1:-1000}" "${2:-5400}"
