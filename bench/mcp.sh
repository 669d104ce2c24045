#!/usr/bin/env bash
# The cost of the MCP layer, in one run on one server: the `run` round trip of `echo hi`
# through `boxwood mcp`, through the published contree-mcp and through the raw API (spawn, then
# the event stream to `completion`), p50/p95 of N each, interleaved; and the second `rsync` of
# an unchanged 2 000-file tree through each MCP server.
# Targets: the native MCP adds <= 10 ms p50 over the raw API and is faster than contree-mcp;
# an unchanged re-sync takes <= 100 ms and uploads nothing.
#   bench/mcp.sh [N=30]
# Needs ../shared/conformance (its venv has the mcp client and contree-mcp).
set -euo pipefail
. "$(dirname "$0")/prepare.sh"
venv=$("$root/../shared/conformance/setup.sh" | tail -n 1)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$venv/bin/python" bench/mcp_bench.py "$root/target/release/boxwood" "$work" "${1:-30}" "$venv/bin/contree-mcp"
