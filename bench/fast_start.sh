#!/usr/bin/env bash
# Fast start, measured in one run on this machine with the published contree-client: run
# latency (spawn -> completion of `true` on busybox, p50/p95 of N runs) for cold boot, a clone
# restored per run and the warm pool; sustained throughput at concurrency 4; PSS per idle
# pooled VM. Modes are set through the server config's [vm] table.
#   bench/fast_start.sh [N=30]        THROUGHPUT_RUNS=60 POOLED_SPACING=1.5 (seconds)
#   JAIL_COST=1 bench/fast_start.sh N  each mode unjailed ([vm.jail] enabled = false, network
#                                     filter off) and jailed, back to back; prints the ratios
set -euo pipefail
. "$(dirname "$0")/prepare.sh"
venv=$("$root/../shared/conformance/setup.sh" | tail -n 1)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$venv/bin/python" bench/fast_start.py "$root/target/release/boxwood" "$work" "${1:-30}"
