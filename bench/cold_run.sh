#!/usr/bin/env bash
# Cold-run latency vs raw microVM boot, measured in one run: bench/cold_run.sh [N=10]
# BOXWOOD_ACCEL=tcg|kvm|auto (default tcg).
set -euo pipefail
cd "$(dirname "$0")/.."
export BOXWOOD_AGENT_BIN
BOXWOOD_AGENT_BIN=$(scripts/build-agent.sh | tail -n 1)
cargo bench --locked -p boxwood --bench cold_run -- "${1:-10}"
