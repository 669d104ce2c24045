#!/usr/bin/env bash
# Prepares everything Boxwood needs on a fresh Debian 12 / Ubuntu machine and starts the
# server on 127.0.0.1, printing its URL and an API token.
#   BOXWOOD_LISTEN (default 127.0.0.1:8080), BOXWOOD_STATE_DIR (default /var/lib/boxwood)
set -euo pipefail
cd "$(dirname "$0")/.."
sudo_if_needed() { if [[ $(id -u) == 0 ]]; then "$@"; else sudo "$@"; fi; }
sudo_if_needed scripts/install-deps.sh
scripts/build-agent.sh >/dev/null
cargo build --release --locked -p boxwood
export BOXWOOD_LISTEN=${BOXWOOD_LISTEN:-127.0.0.1:8080}
export BOXWOOD_STATE_DIR=${BOXWOOD_STATE_DIR:-/var/lib/boxwood}
# QEMU, /dev/kvm and the state directory need root on a stock machine.
if [[ $(id -u) == 0 ]]; then exec target/release/boxwood serve "$@"; else exec sudo -E target/release/boxwood serve "$@"; fi
