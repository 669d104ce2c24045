#!/usr/bin/env bash
# Image import and grep, each next to the standard tools on the same data, in one run:
#  - import of a Debian (bookworm, minbase) image from a loopback docker-registry through the
#    API (spawn → SUCCESS) vs `skopeo copy` + `umoci unpack` of the same image;
#  - grep through the API vs `rg` on the same unpacked tree.
#   bench/import.sh [ROUNDS=3]          (needs network access to Debian's mirrors for mmdebstrap)
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
root=$PWD
sudo_if_needed() { if [[ $(id -u) == 0 ]]; then "$@"; else sudo "$@"; fi; }
sudo_if_needed scripts/install-deps.sh
need=()
for p in mmdebstrap ripgrep; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || need+=("$p"); done
((${#need[@]} == 0)) || sudo_if_needed apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
export BOXWOOD_AGENT_BIN
BOXWOOD_AGENT_BIN=$(scripts/build-agent.sh | tail -n 1)
cargo build --release --locked -p boxwood >&2

work=$(mktemp -d)
cleanup() { [[ -n ${server:-} ]] && kill "$server" 2>/dev/null; [[ -n ${registry:-} ]] && kill "$registry" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
mkdir -p "$work/reg"
printf 'version: 0.1\nlog: { level: warn }\nstorage: { filesystem: { rootdirectory: %s } }\nhttp: { addr: 127.0.0.1:%s, secret: s }\n' \
  "$work/reg/data" "$port" > "$work/reg/config.yml"
docker-registry serve "$work/reg/config.yml" >"$work/reg/log" 2>&1 &
registry=$!

echo "building a Debian bookworm minbase image (mmdebstrap + umoci) ..." >&2
mmdebstrap --quiet --variant=minbase bookworm "$work/debian.tar"
umoci init --layout "$work/oci" && umoci new --image "$work/oci:bookworm"
umoci unpack --image "$work/oci:bookworm" "$work/bundle" >/dev/null
tar -xf "$work/debian.tar" -C "$work/bundle/rootfs"
umoci repack --image "$work/oci:bookworm" "$work/bundle"
rm -rf "$work/bundle" "$work/debian.tar"
for _ in $(seq 1 50); do curl -fs "http://127.0.0.1:$port/v2/" >/dev/null && break; sleep 0.1; done
skopeo copy --quiet --dest-tls-verify=false "oci:$work/oci:bookworm" "docker://127.0.0.1:$port/bench/debian:bookworm"

state="$work/state"
# One namespace per round: an unchanged re-import within a namespace is deduplicated (free),
# so each round imports into a fresh one to measure the full work every time.
for i in $(seq 1 "$rounds"); do
  printf '[[tokens]]\ntoken = "bench-%s"\nnamespace = "bench%s"\n' "$i" "$i"
done > "$work/boxwood.toml"
RUST_LOG=${RUST_LOG:-info,boxwood_core=debug} target/release/boxwood serve --config "$work/boxwood.toml" \
  --state-dir "$state" --listen 127.0.0.1:0 --accel tcg >"$work/out" 2>"$work/server.log" &
server=$!
for _ in $(seq 1 120); do grep -q '^BOXWOOD_URL=' "$work/out" 2>/dev/null && break; sleep 0.5; done
url=$(sed -n 's/^BOXWOOD_URL=//p' "$work/out"); token=unused

python3 - "$url" "$token" "127.0.0.1:$port" "$work" "$rounds" <<'PY'
import json, os, shutil, statistics, subprocess, sys, time, urllib.request
url, token, reg, work, rounds = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
def api(method, path, body=None, token="bench-1"):
    req = urllib.request.Request(url + "/v1" + path, method=method, data=json.dumps(body).encode() if body else None,
                                 headers={"Authorization": "Bearer " + token, "Content-Type": "application/json"})
    with urllib.request.urlopen(req) as r:
        return json.load(r)
def boxwood_import(tag, token):
    t = time.monotonic()
    op = api("POST", "/images/import", {"registry": {"url": f"docker://{reg}/bench/debian:bookworm"}, "tag": tag},
             token=token)["uuid"]
    while True:
        o = api("GET", f"/operations/{op}", token=token)
        if o["status"] in ("SUCCESS", "FAILED", "CANCELLED"):
            assert o["status"] == "SUCCESS", o
            return time.monotonic() - t, o["result"]["image"]
        time.sleep(0.05)
def tools_import(i):
    dst = os.path.join(work, f"pull{i}")
    t = time.monotonic()
    subprocess.run(["skopeo", "copy", "--quiet", "--src-tls-verify=false", f"docker://{reg}/bench/debian:bookworm",
                    f"oci:{dst}:x"], check=True)
    subprocess.run(["umoci", "unpack", "--image", f"{dst}:x", dst + "-bundle"], check=True, stdout=subprocess.DEVNULL)
    return time.monotonic() - t, dst + "-bundle/rootfs"
ours, theirs, tree, image = [], [], None, None
for i in range(rounds):  # interleaved, each side doing the full work every round
    s, tree_i = tools_import(i)
    theirs.append(s)
    if tree: shutil.rmtree(os.path.dirname(tree), ignore_errors=True)
    tree = tree_i
    took, image = boxwood_import("bench/debian:1", f"bench-{i + 1}")
    ours.append(took)
again, _ = boxwood_import("bench/debian:2", "bench-1")
mo, mt = statistics.median(ours), statistics.median(theirs)
print(f"import Debian bookworm minbase ({reg}), median of {rounds}:")
print(f"  boxwood (API, full import):           {mo:6.2f} s   {' '.join(f'{x:.2f}' for x in ours)}")
print(f"  skopeo copy + umoci unpack:           {mt:6.2f} s   {' '.join(f'{x:.2f}' for x in theirs)}")
print(f"  ratio {mo / mt:.2f}x; boxwood re-import of the unchanged image: {again:.2f} s (dedup)")
pattern, path = "Copyright", "/usr/share/doc"
# Both sides produce every match as JSON records (rg --json); neither output is parsed
# inside the timed region.
def grep_api():
    req = urllib.request.Request(url + f"/v1/inspect/{image}/grep?pattern={pattern}&path={path}&max_total=10000",
                                 headers={"Authorization": f"Bearer bench-{rounds}"})
    t = time.monotonic()
    with urllib.request.urlopen(req) as resp:
        body = resp.read()
    took = time.monotonic() - t
    r = json.loads(body)
    return took, len(r["matches"]), r["truncated"]
def grep_rg():
    t = time.monotonic()
    out = subprocess.run(["rg", "--json", "--no-ignore", "--hidden", "--no-follow", pattern, tree + path],
                         capture_output=True, text=True)
    took = time.monotonic() - t
    return took, sum(1 for l in out.stdout.splitlines() if l.startswith('{"type":"match"'))
g = [grep_api() for _ in range(rounds)]
r = [grep_rg() for _ in range(rounds)]
gm, rm = statistics.median(x[0] for x in g), statistics.median(x[0] for x in r)
print(f"grep {pattern!r} in {path}: boxwood {gm*1000:7.1f} ms ({g[0][1]} matches, truncated={g[0][2]}), "
      f"rg {rm*1000:7.1f} ms ({r[0][1]} matches)   ratio {gm / rm:.2f}x")
PY
echo "server-side phases of each import:"
sed -n 's/\x1b\[[0-9;]*m//g; s/.*import phases.*\(fetch_and_unpack_ms=[0-9]*\).*\(publish_ms=[0-9]*\).*/  \1 \2/p' "$work/server.log"
