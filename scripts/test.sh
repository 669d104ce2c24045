#!/usr/bin/env bash
# Runs Boxwood's whole test suite on a fresh Debian 12 or 13 machine: installs what is missing,
# checks formatting and lints, runs the workspace tests (real QEMU microVMs under TCG), drives a
# real server with the published Contree clients (scripts/conformance.sh; needs
# ../shared/conformance), then runs the workspace tests again in clean Debian 12 and 13 roots
# (scripts/distro-tests.sh).
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

if [[ ! -x $root/../shared/conformance/setup.sh ]]; then
  echo "== conformance: ../shared/conformance not found, skipped"
else
  # The published clients against a real server: contree-client's live suite, contree-mcp
  # scenarios, and our contree-cli / contree-sdk end-to-end tests (tests/clients/).
  cargo build --locked -p boxwood
  scripts/conformance.sh
fi

# The workspace tests again on clean Debian 12 and 13 roots, each with its own QEMU and kernel
# (this host's may be either, or QEMU from backports). BOXWOOD_DISTROS="" skips them.
for suite in ${BOXWOOD_DISTROS-bookworm trixie}; do
  echo "== workspace tests on Debian $suite"
  if ! cargo nextest --version >/dev/null 2>&1; then
    echo "== skipped: needs cargo-nextest (its archives carry the tests into the root)"
    continue
  fi
  sudo_if_needed env "PATH=$PATH" scripts/distro-tests.sh "$suite"
done
