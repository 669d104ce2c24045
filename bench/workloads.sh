#!/usr/bin/env bash
# Real workloads on the Python image, measured in one run on this machine: `pip install flask`
# in a Boxwood run vs a host venv (the TCG slowdown), the persist cost of a 500 MiB diff vs a
# `cp` of 500 MiB on the host (target <= 1.5x), then fast start with the writable layer in
# guest RAM vs on its scratch disk (bench/fast_start.sh with SCRATCH_COST=1; target <= 10 ms
# added to a pooled run's p50).
#   bench/workloads.sh [N=3] [FAST_START_N=20]     (WORKLOADS=persist: the persist part only)
# Needs root (mmdebstrap builds the image; scripts/install-deps.sh) and the network.
set -euo pipefail
. "$(dirname "$0")/prepare.sh"
images=$root/target/test-images/python
scripts/python-image.sh "$images"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 bench/workloads.py "$root/target/release/boxwood" "$work" "$images/oci" "${1:-3}"
if [ "${WORKLOADS:-all}" = all ]; then
  SCRATCH_COST=1 bench/fast_start.sh "${2:-20}"
fi
