#!/usr/bin/env bash
# Installs the Debian packages Boxwood needs on a fresh Debian 12 machine (idempotent).
#
# A fresh machine may carry qemu-utils 10 from backports, which Breaks Debian 12's
# qemu-system-common 7.2; QEMU 7.2 is the one whose microvm/TCG behaviour Boxwood is
# tuned for, so all three QEMU packages are pinned to the qemu-system-x86 candidate.
set -euo pipefail

need_root() { [[ $(id -u) == 0 ]] || { echo "install-deps: run as root" >&2; exit 1; }; }

# nftables: the guest egress filter (crates/vm/src/egress.rs).
# e2fsprogs: mkfs.ext4 formats the runs' scratch disks (crates/vm/src/scratch.rs).
# docker-registry, skopeo, umoci, apache2-utils (htpasswd): boxwood-oci's image-import tests.
# python3-venv, curl: the conformance runs with the published Python clients.
# openssl: e2e ca_certs makes a CA certificate. mmdebstrap: e2e python builds its image.
packages=(busybox-static erofs-utils e2fsprogs lz4 linux-image-cloud-amd64 ca-certificates nftables
  docker-registry skopeo umoci apache2-utils python3-venv curl openssl mmdebstrap)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
have_qemu=0
if command -v qemu-system-x86_64 >/dev/null 2>&1; then have_qemu=1; fi

if ((${#missing[@]} == 0 && have_qemu == 1)); then
  exit 0
fi
need_root
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
if ((have_qemu == 0)); then
  qv=$(apt-cache policy qemu-system-x86 | awk '/Candidate:/{print $2}')
  [[ -n $qv && $qv != "(none)" ]] || { echo "install-deps: no qemu-system-x86 candidate" >&2; exit 1; }
  missing+=("qemu-system-x86=$qv" "qemu-system-common=$qv" "qemu-utils=$qv")
fi
apt-get install -y -qq --no-install-recommends --allow-downgrades "${missing[@]}"
