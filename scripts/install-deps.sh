#!/usr/bin/env bash
# Installs the Debian packages Boxwood needs on a fresh Debian 12 or 13 machine (idempotent),
# each with its own QEMU and cloud kernel. Nothing is downgraded: a machine that already has
# a QEMU package (qemu-utils from backports, say, which Breaks an older qemu-system-common)
# gets qemu-system-x86 at that same version, from the suite it came from.
set -euo pipefail

need_root() { [[ $(id -u) == 0 ]] || { echo "install-deps: run as root" >&2; exit 1; }; }

# nftables: the guest egress filter (crates/vm/src/egress.rs).
# e2fsprogs: mkfs.ext4 formats the runs' scratch disks (crates/vm/src/scratch.rs).
# docker-registry, skopeo, umoci, apache2-utils (htpasswd): boxwood-oci's image-import tests.
# python3-venv, curl: the conformance runs with the published Python clients.
# openssl: e2e ca_certs makes a CA certificate. mmdebstrap: e2e python builds its image.
# gcc, libc6-dev: e2e abuse_guest builds a static guest program (and cargo links with cc).
# procps: scripts/scan-state.sh (e2e abuse_state) lists the server's QEMUs with ps.
# prometheus: e2e metrics scrapes /metrics with a real Prometheus.
packages=(busybox-static erofs-utils e2fsprogs lz4 linux-image-cloud-amd64 ca-certificates nftables
  docker-registry skopeo umoci apache2-utils python3-venv curl openssl mmdebstrap gcc libc6-dev procps
  prometheus)
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
# No service of these packages is started (docker-registry and prometheus ship one; the tests
# run their own on random ports): the standard policy-rc.d veto, for this install only.
if [[ ! -e /usr/sbin/policy-rc.d ]]; then
  printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod 0755 /usr/sbin/policy-rc.d
  trap 'rm -f /usr/sbin/policy-rc.d' EXIT
fi
apt-get update -qq
# The archive suite that offers qemu-system-x86 at version $1 (e.g. bookworm-backports), if any.
# (`apt-cache show pkg=version` succeeds even for a version it does not know; madison lists.)
suite_of() {
  apt-cache madison qemu-system-x86 | awk -F'|' -v v="$1" '{gsub(/ /, "", $2)} $2 == v {split($3, w, " "); sub(/\/.*/, "", w[2]); print w[2]; exit}'
}
qemu=()
if ((have_qemu == 0)); then
  # The version of a QEMU package already installed, if any.
  # (dpkg-query fails when a package is unknown: not an error here.)
  have=$({ dpkg-query -W -f='${Status} ${Version}\n' qemu-utils qemu-system-common 2>/dev/null || true; } |
    awk '$3 == "installed" {print $4; exit}')
  if [[ -z $have ]]; then
    missing+=(qemu-system-x86)
  else
    suite=$(suite_of "$have")
    if [[ -z $suite && $have == *~bpo* ]]; then
      # It came from backports, which this machine no longer lists: list it again (nothing is
      # taken from it unless asked for, as below).
      . /etc/os-release
      echo "install-deps: QEMU $have is installed; adding ${VERSION_CODENAME}-backports for its qemu-system-x86" >&2
      printf 'Types: deb\nURIs: http://deb.debian.org/debian\nSuites: %s-backports\nComponents: main\n' \
        "$VERSION_CODENAME" >/etc/apt/sources.list.d/boxwood-backports.sources
      apt-get update -qq
      suite=$(suite_of "$have")
    fi
    [[ -n $suite ]] || {
      echo "install-deps: QEMU $have is installed but qemu-system-x86 $have is not available;" \
        "install qemu-system-x86 of that version, or remove the other QEMU packages" >&2
      exit 1
    }
    # Its dependencies at versions from the same suite (qemu-system-data, seabios, …).
    qemu=(-t "$suite" "qemu-system-x86=$have" "qemu-system-common=$have")
  fi
fi
if ((${#missing[@]} > 0)); then
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
if ((${#qemu[@]} > 0)); then
  apt-get install -y -qq --no-install-recommends "${qemu[@]}"
fi
