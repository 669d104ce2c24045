#!/usr/bin/env bash
# Builds the Python test image as an OCI layout, offline from anything but Debian's mirror:
# Debian bookworm (Python 3.11) with python3, pip, venv and python-is-python3, shaped like
# docker.io/library/python:3.11 (pip installs into the system, PATH and CMD as there).
#   scripts/python-image.sh DIR    → DIR/oci holds the image as tag 3.11 (kept if already built)
# Needs root, mmdebstrap and umoci (scripts/install-deps.sh).
set -euo pipefail
out=${1:?usage: python-image.sh DIR}
mkdir -p "$out"
exec 9>"$out/.lock"
flock 9
[[ -f $out/oci/.complete ]] && exit 0
rm -rf "$out/oci" "$out/bundle" "$out/rootfs.tar"
# No EXTERNALLY-MANAGED marker: the docker image's Python is not Debian's, and `pip install`
# as root works there.
mmdebstrap --quiet --variant=minbase \
  --include=python3,python3-pip,python3-venv,python-is-python3,ca-certificates \
  --customize-hook='rm -f "$1"/usr/lib/python3*/EXTERNALLY-MANAGED; rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*' \
  bookworm "$out/rootfs.tar"
umoci init --layout "$out/oci"
umoci new --image "$out/oci:3.11"
umoci unpack --image "$out/oci:3.11" "$out/bundle" >/dev/null
tar -xf "$out/rootfs.tar" -C "$out/bundle/rootfs"
umoci repack --image "$out/oci:3.11" "$out/bundle"
umoci config --image "$out/oci:3.11" --config.cmd python3 \
  --config.env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin --config.env LANG=C.UTF-8
umoci gc --layout "$out/oci"
rm -rf "$out/bundle" "$out/rootfs.tar"
touch "$out/oci/.complete"
