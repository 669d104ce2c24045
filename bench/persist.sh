#!/usr/bin/env bash
# Extra time of a persisted run over a disposable one (1 KiB change), small vs 520 MiB image.
#   bench/persist.sh [N=8]
set -euo pipefail
cd "$(dirname "$0")/.."
export BOXWOOD_AGENT_BIN
BOXWOOD_AGENT_BIN=$(scripts/build-agent.sh | tail -n 1)
cargo bench --locked -p boxwood --bench persist -- "${1:-8}"
