"""MCP benchmark driver (run by bench/mcp.sh; not named mcp.py, which would shadow the mcp package): one Boxwood server; every number from this run.

  run     `echo hi` on busybox through the raw API (POST /v1/instances, then the event stream
          to `completion`), through `boxwood mcp` and through contree-mcp, interleaved
  rsync   the second sync of an unchanged 2 000-file tree through each MCP server
"""

import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import time
import urllib.request

from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client

BIN, WORK, N, CONTREE_MCP = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
IMAGE = "tag:busybox:latest"
FILES = 2000


def start_server():
    out, log = os.path.join(WORK, "server.out"), os.path.join(WORK, "server.log")
    proc = subprocess.Popen([BIN, "serve", "--state-dir", os.path.join(WORK, "state"), "--listen", "127.0.0.1:0",
                             "--accel", os.environ.get("BOXWOOD_ACCEL", "tcg")],
                            stdout=open(out, "w"), stderr=open(log, "w"))
    for _ in range(600):
        text = open(out).read()
        url, token = re.search(r"^BOXWOOD_URL=(.*)$", text, re.M), re.search(r"^BOXWOOD_TOKEN=(.*)$", text, re.M)
        if url and token:
            return proc, url.group(1), token.group(1)
        if proc.poll() is not None:
            raise SystemExit(f"server exited:\n{open(log).read()[-3000:]}")
        time.sleep(0.2)
    raise SystemExit("server did not start")


def raw_run(url, token):
    """Spawn, then follow the event stream to `completion`, as an API client does."""
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    t0 = time.perf_counter()
    body = json.dumps({"command": "echo hi", "image": IMAGE, "shell": True}).encode()
    with urllib.request.urlopen(urllib.request.Request(url + "/v1/instances", data=body, headers=headers)) as r:
        op = json.loads(r.read())["uuid"]
    req = urllib.request.Request(f"{url}/v1/operations/{op}/events?follow=1", headers=headers)
    with urllib.request.urlopen(req) as r:
        for line in r:
            if line.startswith(b"event: completion"):
                break
    return time.perf_counter() - t0


def output(res):
    """A tool's structured result (FastMCP, contree-mcp's, wraps it as {"result": …})."""
    out = res.structuredContent
    if out is None:
        out = json.loads("".join(getattr(c, "text", "") for c in res.content))
    if isinstance(out, dict) and set(out) == {"result"}:
        out = out["result"]
    return out


async def mcp_run(session):
    t0 = time.perf_counter()
    res = await session.call_tool("run", {"command": "echo hi", "image": IMAGE})
    dt = time.perf_counter() - t0
    out = output(res)
    if res.isError or out.get("stdout") != "hi\n":
        raise SystemExit(f"run through MCP failed: {res}")
    return dt


async def mcp_rsync(session, tree):
    res = await session.call_tool("rsync", {"source": tree, "destination": "/app"})
    if res.isError:
        raise SystemExit(f"rsync failed: {res}")
    return output(res)


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


async def main():
    proc, url, token = start_server()
    tree = os.path.join(WORK, "tree")
    for i in range(FILES):
        d = os.path.join(tree, f"d{i % 40}")
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, f"f{i}.txt"), "w") as f:
            f.write(f"file {i}\n")
    env = dict(os.environ, HOME=os.path.join(WORK, "home"), CONTREE_HOME=os.path.join(WORK, "contree"),
               CONTREE_NO_UPDATE_CHECK="1")
    native = StdioServerParameters(command=BIN, args=["mcp", "--url", url, "--token", token], env=env)
    contree = StdioServerParameters(command=CONTREE_MCP, args=["--auth-type", "jwt", "--url", url, "--token", token],
                                    env=env)
    try:
        async with stdio_client(native) as (nr, nw), stdio_client(contree) as (cr, cw):
            async with ClientSession(nr, nw) as ns, ClientSession(cr, cw) as cs:
                await ns.initialize()
                await cs.initialize()
                for _ in range(3):  # warm-up: pool, caches, first connections
                    raw_run(url, token), await mcp_run(ns), await mcp_run(cs)
                raw, nat, con = [], [], []
                for _ in range(N):
                    raw.append(raw_run(url, token))
                    nat.append(await mcp_run(ns))
                    con.append(await mcp_run(cs))
                syncs = {}
                for name, s in (("boxwood mcp", ns), ("contree-mcp", cs)):
                    first = await mcp_rsync(s, tree)
                    t0 = time.perf_counter()
                    second = await mcp_rsync(s, tree)
                    syncs[name] = (time.perf_counter() - t0, first, second)
    finally:
        proc.terminate()
        proc.wait(timeout=120)

    ms = lambda x: f"{x * 1e3:7.1f} ms"
    print()
    print(f"MCP round trips of `echo hi` on busybox ({os.environ.get('BOXWOOD_ACCEL', 'tcg')}), N={N} each, "
          f"{time.strftime('%F %T')}")
    print(f"{'':24s} {'p50':>10s} {'p95':>10s}")
    for name, xs in (("raw API (spawn + SSE)", raw), ("boxwood mcp", nat), ("contree-mcp 0.5.0", con)):
        print(f"{name:24s} {ms(statistics.median(xs))} {ms(pct(xs, 95))}")
    added = statistics.median(nat) - statistics.median(raw)
    print(f"boxwood mcp adds {added * 1e3:+.1f} ms p50 over the raw API (target <= 10 ms); "
          f"contree-mcp {(statistics.median(con) - statistics.median(raw)) * 1e3:+.1f} ms "
          f"(native faster: {statistics.median(nat) < statistics.median(con)})")
    for name, (dt, first, second) in syncs.items():
        uploaded = second.get("uploaded") if isinstance(second, dict) else "?"
        print(f"second rsync of {FILES} unchanged files, {name:12s} {ms(dt)}   uploaded: {uploaded}"
              + ("   (target <= 100 ms, nothing uploaded)" if name == "boxwood mcp" else ""))


asyncio.run(main())
