#!/usr/bin/env bash
# Drives a real Boxwood server with the published Contree clients:
#  - contree-client 0.4.4's live integration suite (../shared/conformance/client_suite.sh),
#  - contree-mcp 0.5.0 tool scenarios (../shared/conformance/mcp_check.sh), and the same
#    scenarios through our own `boxwood mcp` (stdio) and the server's `/mcp` (HTTP),
#  - our own contree-cli 0.9.4 and contree-sdk 0.3.6 end-to-end checks (tests/clients/).
# The server mirrors docker.io to a loopback docker-registry holding library/busybox:latest
# (built here from busybox-static), so imports work without Internet access.
#   scripts/conformance.sh [client|mcp|native-mcp|mcp-http|clients ...]   (default: all five)
# Expects scripts/install-deps.sh to have run and target/debug/boxwood to be built.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
conformance=$root/../shared/conformance
parts=("$@")
((${#parts[@]})) || parts=(client mcp native-mcp mcp-http clients)

work=$(mktemp -d)
cleanup() {
  [[ -n ${server:-} ]] && kill "$server" 2>/dev/null && wait "$server" 2>/dev/null
  [[ -n ${registry:-} ]] && kill "$registry" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

echo "== loopback registry with library/busybox:latest"
port=$(free_port)
printf 'version: 0.1\nlog: { level: warn }\nstorage: { filesystem: { rootdirectory: %s } }\nhttp: { addr: 127.0.0.1:%s, secret: s }\n' \
  "$work/reg" "$port" >"$work/registry.yml"
docker-registry serve "$work/registry.yml" >"$work/registry.log" 2>&1 &
registry=$!
umoci init --layout "$work/oci" && umoci new --image "$work/oci:busybox"
umoci unpack --image "$work/oci:busybox" "$work/bundle" >/dev/null
rootfs=$work/bundle/rootfs
mkdir -p "$rootfs"/{bin,etc,tmp,root}
cp /bin/busybox "$rootfs/bin/busybox"
for applet in $(/bin/busybox --list); do [[ -e $rootfs/bin/$applet ]] || ln -s busybox "$rootfs/bin/$applet"; done
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n' >"$rootfs/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' >"$rootfs/etc/group"
umoci config --image "$work/oci:busybox" --config.env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
umoci repack --image "$work/oci:busybox" "$work/bundle" >/dev/null
for _ in $(seq 1 50); do curl -fs "http://127.0.0.1:$port/v2/" >/dev/null && break; sleep 0.1; done
skopeo copy --quiet --dest-tls-verify=false "oci:$work/oci:busybox" "docker://127.0.0.1:$port/library/busybox:latest"

echo "== server (docker.io mirrored to 127.0.0.1:$port)"
# /mcp may use this host's files here (the scenarios' rsync and download): one user, ours.
printf '[registry]\nmirrors = { "docker.io" = ["http://127.0.0.1:%s"] }\n[mcp]\nhost_files = true\n' "$port" \
  >"$work/boxwood.toml"
target/debug/boxwood serve --config "$work/boxwood.toml" --state-dir "$work/state" --listen 127.0.0.1:0 \
  --accel "${BOXWOOD_ACCEL:-tcg}" >"$work/out" 2>"$work/server.log" &
server=$!
for _ in $(seq 1 240); do
  grep -q '^BOXWOOD_TOKEN=' "$work/out" 2>/dev/null && break
  kill -0 "$server" 2>/dev/null || { cat "$work/server.log"; exit 1; }
  sleep 0.5
done
url=$(sed -n 's/^BOXWOOD_URL=//p' "$work/out")
token=$(sed -n 's/^BOXWOOD_TOKEN=//p' "$work/out")
[[ -n $url && -n $token ]] || { echo "server did not start"; cat "$work/server.log"; exit 1; }
venv=$("$conformance/setup.sh" | tail -n 1)

# The suite's event-log tests need a finished instance operation in the namespace (they skip
# otherwise): run one first, through the API, and check it succeeded.
echo "== smoke run"
"$venv/bin/python" - "$url" "$token" <<'PY'
import sys
from contree_client.sync import ContreeClient
with ContreeClient(base_url=sys.argv[1], token=sys.argv[2]) as c:
    op = c.spawn_instance(command="echo smoke", image="tag:busybox:latest", shell=True, disposable=True)
    done = c.wait_operation(op.uuid, timeout=120)
    assert done.status == "SUCCESS" and "smoke" in done.metadata.result.stdout.value, done
PY

failed=()
for part in "${parts[@]}"; do
  case $part in
    client)
      echo "== contree-client 0.4.4 live integration suite"
      CONTREE_URL=$url CONTREE_TOKEN=$token "$conformance/client_suite.sh" || failed+=(client) ;;
    mcp)
      echo "== contree-mcp 0.5.0 scenarios"
      "$conformance/mcp_check.sh" --url "$url" --token "$token" || failed+=(mcp) ;;
    native-mcp)
      echo "== the same scenarios through boxwood mcp (stdio)"
      "$conformance/mcp_check.sh" --url "$url" --token "$token" --mcp-command "$root/target/debug/boxwood" \
        --mcp-args "mcp --url {url} --token {token}" ${MCP_ONLY:+--only $MCP_ONLY} || failed+=(native-mcp) ;;
    mcp-http)
      echo "== the same scenarios through the server's own /mcp (streamable HTTP)"
      "$conformance/mcp_check.sh" --url "$url" --token "$token" --mcp-http "$url/mcp" \
        ${MCP_ONLY:+--only $MCP_ONLY} || failed+=(mcp-http) ;;
    clients)
      echo "== contree-cli 0.9.4 and contree-sdk 0.3.6 end to end"
      BOXWOOD_URL=$url BOXWOOD_TOKEN=$token "$venv/bin/python" -m pytest -q -p no:cacheprovider \
        --timeout 600 tests/clients || failed+=(clients) ;;
    *) echo "unknown part $part"; exit 2 ;;
  esac
done
# After every client has had its go: nothing under the state dir may be setuid, a device,
# carry capabilities or be readable by others, and no QEMU of the server (the idle pool's
# included) may run as root. The self-test first shows the scan fails on each kind of finding.
echo "== state-dir and process scan"
scripts/scan-state.sh --self-test >/dev/null || failed+=(scan-self-test)
scripts/scan-state.sh "$work/state" "$server" || failed+=(scan)
if ((${#failed[@]})); then
  echo "--- failed: ${failed[*]}; server log (tail)"
  tail -n 80 "$work/server.log"
  exit 1
fi
echo "== conformance: all passed"
