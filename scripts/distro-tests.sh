#!/usr/bin/env bash
# Runs the workspace's test binaries — the real-VM tier included — a second time on Debian 13
# (QEMU 10, kernel 6.12 with xz-compressed modules): in a Debian trixie root built with
# mmdebstrap, whose packages come from scripts/install-deps.sh run inside it (so that script is
# checked on Debian 13 as well), entered as its own mount namespace.
#   scripts/debian13.sh [DIR]   DIR (default target/debian13) holds the root and the test archive
# Needs root, mmdebstrap, cargo-nextest; the tests are built here (Debian 12) and run there.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
work=$(realpath -m "${1:-target/debian13}")
root=$work/root
mkdir -p "$work"

if [[ ! -f $root/.complete ]]; then
  echo "== debian13: building the trixie root"
  rm -rf "$root"
  mmdebstrap --quiet --variant=minbase --include=ca-certificates trixie "$root" \
    "deb http://deb.debian.org/debian trixie main" \
    "deb http://deb.debian.org/debian trixie-updates main" \
    "deb http://deb.debian.org/debian-security trixie-security main"
  touch "$root/.complete"
fi
# The root lives on the network this machine does: trust what the host trusts (an
# intercepting proxy's CA, say), as a Debian 13 machine here would be set up.
if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
  cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/"
fi
cp /etc/resolv.conf "$root/etc/resolv.conf"
install -m 0755 "$(command -v cargo-nextest)" "$root/usr/local/bin/cargo-nextest"

echo "== debian13: archiving the workspace tests"
agent=$(scripts/build-agent.sh | tail -n 1)
cargo nextest archive --workspace --locked --archive-file "$root/var/tmp/tests.tar.zst"

# Inside: the repository at the same path (tests find their sources and the agent there),
# /proc, /sys and /dev of this machine; then pivot_root into the root, as a container runtime
# does, so that the namespace's root is the trixie root (the jail's own pivot_root and its
# mountinfo checks see what they see on a real host).
inner=$(cat <<'EOF'
set -euo pipefail
mount --bind "$ROOT" "$ROOT"
mkdir -p "$ROOT$REPO" "$ROOT/.oldroot"
mount --bind "$REPO" "$ROOT$REPO"
mount -t proc proc "$ROOT/proc"
mount --rbind /sys "$ROOT/sys"
mount --rbind /dev "$ROOT/dev"
mount -t tmpfs -o mode=1777 tmpfs "$ROOT/tmp"
cd "$ROOT"
pivot_root . .oldroot
umount -l /.oldroot
cd /
exec /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  HOME=/root LANG=C.UTF-8 BOXWOOD_AGENT_BIN="$AGENT" REPO="$REPO" ARCHIVE="$ARCHIVE" NEXTEST_ARGS="$NEXTEST_ARGS" \
  bash -euo pipefail -c '
    update-ca-certificates >/dev/null
    "$REPO/scripts/install-deps.sh"
    echo "== debian13: $(qemu-system-x86_64 --version | head -n 1); kernel $(ls /lib/modules)"
    cd "$REPO"
    # shellcheck disable=SC2086
    cargo-nextest nextest run --archive-file "$ARCHIVE" --workspace-remap "$REPO" --no-fail-fast $NEXTEST_ARGS'
EOF
)
echo "== debian13: running the tests in the trixie root"
ROOT=$root REPO=$repo AGENT=$agent ARCHIVE=/var/tmp/tests.tar.zst NEXTEST_ARGS=${NEXTEST_ARGS:-} \
  unshare --mount --propagation private bash -c "$inner"
