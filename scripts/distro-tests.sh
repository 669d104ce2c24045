#!/usr/bin/env bash
# Runs the workspace's test binaries — the real-VM tier included — once more on a clean Debian
# release, with that release's own QEMU and cloud kernel: bookworm (Debian 12: QEMU 7.2, kernel
# 6.1) or trixie (Debian 13: QEMU 10.0, kernel 6.12, zstd vmlinuz, xz modules). The root is
# built with mmdebstrap, its packages come from scripts/install-deps.sh run inside it (so that
# script is checked on a fresh machine of each release), and it is entered as its own mount
# namespace.
#   scripts/distro-tests.sh SUITE [DIR]   DIR (default target/SUITE) holds the root and archive
# Env NEXTEST_ARGS: extra arguments for nextest (a filter, say). Needs root, mmdebstrap and
# cargo-nextest; the tests are built here and run there.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
suite=${1:?usage: scripts/distro-tests.sh bookworm|trixie [DIR]}
case $suite in bookworm | trixie) ;; *) echo "distro-tests: unknown suite $suite" >&2; exit 2 ;; esac
work=$(realpath -m "${2:-target/$suite}")
root=$work/root
mkdir -p "$work"

if [[ ! -f $root/.complete ]]; then
  echo "== $suite: building the root"
  rm -rf "$root"
  mmdebstrap --quiet --variant=minbase --include=ca-certificates "$suite" "$root" \
    "deb http://deb.debian.org/debian $suite main" \
    "deb http://deb.debian.org/debian $suite-updates main" \
    "deb http://deb.debian.org/debian-security $suite-security main"
  touch "$root/.complete"
fi
# The root lives on the network this machine does: trust what the host trusts (an
# intercepting proxy's CA, say), as a machine here would be set up.
if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
  cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/"
fi
cp /etc/resolv.conf "$root/etc/resolv.conf"
install -m 0755 "$(command -v cargo-nextest)" "$root/usr/local/bin/cargo-nextest"

echo "== $suite: archiving the workspace tests"
agent=$(scripts/build-agent.sh | tail -n 1)
cargo nextest archive --workspace --locked --archive-file "$root/var/tmp/tests.tar.zst"

# Inside: the repository at the same path (tests find their sources and the agent there),
# /proc, /sys and /dev of this machine; then pivot_root into the root, as a container runtime
# does, so that the namespace's root is the new root (the jail's own pivot_root and its
# mountinfo checks see what they see on a real host).
inner=$(cat <<'EOF'
set -euo pipefail
mount --bind "$ROOT" "$ROOT"
mkdir -p "$ROOT$REPO" "$ROOT/.oldroot"
mount --bind "$REPO" "$ROOT$REPO"
mount -t proc proc "$ROOT/proc"
mount --rbind /sys "$ROOT/sys"
mount --rbind /dev "$ROOT/dev"
# /tmp on disk, as on the host: the tests' state dirs (and so the runs' scratch disks) live
# there, and on a tmpfs a scratch disk's data would be RAM charged to its VM's memory limit.
rm -rf "$WORK/tmp" && mkdir -m 1777 "$WORK/tmp"
mount --bind "$WORK/tmp" "$ROOT/tmp"
# uid blocks are claimed with locks here, and what they guard (cgroups, nft tables, uids) is
# this host's: share the locks with runtimes outside the root.
mkdir -p /run/boxwood "$ROOT/run/boxwood"
mount --bind /run/boxwood "$ROOT/run/boxwood"
cd "$ROOT"
pivot_root . .oldroot
umount -l /.oldroot
cd /
exec /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  HOME=/root LANG=C.UTF-8 SUITE="$SUITE" BOXWOOD_AGENT_BIN="$AGENT" REPO="$REPO" ARCHIVE="$ARCHIVE" NEXTEST_ARGS="$NEXTEST_ARGS" \
  bash -euo pipefail -c '
    update-ca-certificates >/dev/null
    "$REPO/scripts/install-deps.sh"
    echo "== $SUITE: $(qemu-system-x86_64 --version | head -n 1); kernel $(ls /lib/modules)"
    cd "$REPO"
    # shellcheck disable=SC2086
    cargo-nextest nextest run --archive-file "$ARCHIVE" --workspace-remap "$REPO" --no-fail-fast $NEXTEST_ARGS'
EOF
)
echo "== $suite: running the tests in the root"
SUITE=$suite WORK=$work ROOT=$root REPO=$repo AGENT=$agent ARCHIVE=/var/tmp/tests.tar.zst NEXTEST_ARGS=${NEXTEST_ARGS:-} \
  unshare --mount --propagation private bash -c "$inner"
