#!/usr/bin/env bash
# Runs Boxwood's whole test suite on a fresh Debian 12 machine: installs what is missing,
# checks formatting and lints, runs the workspace tests (real QEMU microVMs under TCG), then
# drives a real server with the published contree-mcp client (if ../shared/conformance exists).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
sudo_if_needed() { if [[ $(id -u) == 0 ]]; then "$@"; else sudo "$@"; fi; }

sudo_if_needed scripts/install-deps.sh
export BOXWOOD_AGENT_BIN
BOXWOOD_AGENT_BIN=$(scripts/build-agent.sh | tail -n 1)

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

echo "== workspace tests"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --locked --no-fail-fast
else
  cargo test --workspace --locked --no-fail-fast
fi

conformance=$root/../shared/conformance
if [[ ! -x $conformance/mcp_check.sh ]]; then
  echo "== conformance: $conformance not found, skipped"
  exit 0
fi
echo "== conformance: contree-mcp against a running server"
cargo build --locked -p boxwood
state=$(mktemp -d)
log=$state/server.log
target/debug/boxwood serve --state-dir "$state" --listen 127.0.0.1:0 --accel tcg >"$state/out" 2>"$log" &
server=$!
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null; rm -rf "$state"' EXIT
for _ in $(seq 1 120); do
  grep -q '^BOXWOOD_TOKEN=' "$state/out" 2>/dev/null && break
  kill -0 $server 2>/dev/null || { cat "$log"; exit 1; }
  sleep 0.5
done
url=$(sed -n 's/^BOXWOOD_URL=//p' "$state/out")
token=$(sed -n 's/^BOXWOOD_TOKEN=//p' "$state/out")
[[ -n $url && -n $token ]] || { echo "server did not start"; cat "$log"; exit 1; }
if ! "$conformance/mcp_check.sh" --url "$url" --token "$token"; then
  echo "--- server log (tail)"; tail -n 60 "$log"
  exit 1
fi
