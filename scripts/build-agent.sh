#!/usr/bin/env bash
# Builds the guest agent as a static glibc binary and prints its path on the last line.
set -euo pipefail
cd "$(dirname "$0")/.."
RUSTFLAGS='-C target-feature=+crt-static' cargo build -p boxwood-agent --profile agent \
    --target x86_64-unknown-linux-gnu --locked >&2
bin="$PWD/target/x86_64-unknown-linux-gnu/agent/boxwood-agent"
test -x "$bin"
echo "$bin"
