#!/usr/bin/env bash
# Sourced by the bench scripts: the repository root as the working directory and $root, the
# guest agent in BOXWOOD_AGENT_BIN, and a release build of the server.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
root=$PWD
export BOXWOOD_AGENT_BIN
BOXWOOD_AGENT_BIN=$(scripts/build-agent.sh | tail -n 1)
cargo build --release --locked -p boxwood >&2
