"""Fast-start benchmark driver (run by bench/fast_start.sh): one Boxwood server per mode, driven
with the published contree-client; every number comes from this run on this machine.

  cold    [vm] snapshot = false             every run boots a kernel
  clone   [vm] pool_size = 0                every run restores a template clone on demand
  pooled  (defaults: snapshot on, pool)     every run takes a restored, warmed clone

Latency: client side, spawn_instance -> wait_operation (completion) of `true` on busybox, N
sequential runs per mode; pooled runs are spaced so the pool refills between them (the latency
a run sees when it finds a warm clone). Throughput: disposable runs/s with 4 client threads,
sustained over many more runs than the pool holds. PSS: /proc/PID/smaps_rollup of each idle
pooled QEMU after the pool is full.

SCRATCH_COST=1: each mode with the writable layer in guest RAM (`upper_disk = false`, the
layout before scratch disks) and on its scratch disk (the default); prints what the disk adds.

JAIL_COST=1: each mode is measured twice, back to back, unjailed first (`[vm.jail] enabled =
false` with `[network] filter = "off"`: without the jail's uid block the egress filter cannot
scope) and then jailed (the default), and the jailed/unjailed ratios are printed.
"""

import atexit
import concurrent.futures
import os
import re
import statistics
import subprocess
import sys
import threading
import time

from contree_client.sync import ContreeClient

BIN, WORK, N = sys.argv[1], sys.argv[2], int(sys.argv[3])
STATE = os.path.join(WORK, "state")
THROUGHPUT_RUNS = int(os.environ.get("THROUGHPUT_RUNS", "60"))
POOLED_SPACING = float(os.environ.get("POOLED_SPACING", "1.5"))
JAIL_COST = os.environ.get("JAIL_COST", "") not in ("", "0")
SCRATCH_COST = os.environ.get("SCRATCH_COST", "") not in ("", "0")
UNJAILED = "[vm.jail]\nenabled = false\n[network]\nfilter = \"off\"\n"


def pct(values, p):
    s = sorted(values)
    return s[min(len(s) - 1, max(0, int(round(p / 100 * len(s) + 0.5)) - 1))]


class Server:
    def __init__(self, mode, vm_table, tables=""):
        self.mode = mode
        cfg = os.path.join(WORK, f"{mode}.toml")
        with open(cfg, "w") as f:
            f.write("[vm]\naccel = \"tcg\"\n" + vm_table + tables)
        self.log_path = os.path.join(WORK, f"{mode}.log")
        self.out_path = os.path.join(WORK, f"{mode}.out")
        env = dict(os.environ, RUST_LOG=os.environ.get("RUST_LOG", "info"))
        self.proc = subprocess.Popen(
            [BIN, "serve", "--config", cfg, "--state-dir", STATE, "--listen", "127.0.0.1:0"],
            stdout=open(self.out_path, "w"), stderr=open(self.log_path, "w"), env=env)
        atexit.register(self.stop)
        url = token = None
        for _ in range(600):
            text = open(self.out_path).read()
            m1, m2 = re.search(r"^BOXWOOD_URL=(.*)$", text, re.M), re.search(r"^BOXWOOD_TOKEN=(.*)$", text, re.M)
            if m1 and m2:
                url, token = m1.group(1), m2.group(1)
                break
            if self.proc.poll() is not None:
                raise SystemExit(f"{mode}: server exited:\n{open(self.log_path).read()[-3000:]}")
            time.sleep(0.2)
        if not url:
            raise SystemExit(f"{mode}: server did not start")
        self.client = ContreeClient(token, base_url=url, timeout=600)
        self.url, self.token = url, token

    def wait_log(self, needle, limit=300):
        deadline = time.time() + limit
        while time.time() < deadline:
            if needle in open(self.log_path).read():
                return
            time.sleep(0.1)
        raise SystemExit(f"{self.mode}: no {needle!r} in the server log after {limit}s")

    def run_true(self):
        t0 = time.monotonic()
        op = self.client.spawn_instance("true", "tag:busybox:latest", disposable=True)
        res = self.client.wait_operation(op.uuid)
        dt = (time.monotonic() - t0) * 1000
        status = res.status.value if hasattr(res.status, "value") else str(res.status)
        if "SUCCESS" not in str(status).upper():
            raise SystemExit(f"{self.mode}: run failed: {res}")
        return dt

    def latencies(self, n, spacing=0.0):
        self.run_true()  # first request: connection, caches
        out = []
        for _ in range(n):
            if spacing:
                time.sleep(spacing)
            out.append(self.run_true())
        return out

    def throughput(self, runs, concurrency=4):
        t0 = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(concurrency) as ex:
            clients = [ContreeClient(self.token, base_url=self.url, timeout=600) for _ in range(concurrency)]

            def worker(i):
                c, done = clients[i], 0
                while True:
                    with lock:
                        if counter[0] >= runs:
                            return done
                        counter[0] += 1
                    op = c.spawn_instance("true", "tag:busybox:latest", disposable=True)
                    c.wait_operation(op.uuid)
                    done += 1

            lock, counter = threading.Lock(), [0]
            total = sum(ex.map(worker, range(concurrency)))
        return total / (time.monotonic() - t0)

    def pooled_pss(self):
        rows = []
        run_dir = os.path.join(STATE, "run")
        for d in sorted(os.listdir(run_dir)):
            if not d.startswith("pool-"):
                continue
            try:
                pid = int(open(os.path.join(run_dir, d, "qemu.pid")).read())
                rollup = open(f"/proc/{pid}/smaps_rollup").read()
            except (OSError, ValueError):
                continue
            kb = {k: int(v) for k, v in re.findall(r"^(\w+):\s+(\d+) kB", rollup, re.M)}
            rows.append(kb)
        return rows

    def stop(self):
        if self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def summary(name, values):
    return f"{name:34s} n={len(values):3d}  p50 {statistics.median(values):7.0f} ms   p95 {pct(values, 95):7.0f} ms"


def measure(variants):
    """Runs the three modes for each `(label, tables)` variant, modes outermost, so the variants
    of one mode run back to back under the same load. Returns {label: (results, lines, tps, pss)}."""
    out = {label: ({}, [], {}, []) for label, _ in variants}
    for label, tables in variants:
        tag = f" [{label}]" if label else ""
        results, lines, _, _ = out[label]
        srv = Server(f"cold{label}", "snapshot = false\n", tables)
        results["cold"] = srv.latencies(N)
        lines.append(summary(f"cold boot (snapshot = false){tag}", results["cold"]))
        srv.stop()
    for label, tables in variants:
        tag = f" [{label}]" if label else ""
        results, lines, tps, _ = out[label]
        srv = Server(f"clone{label}", "pool_size = 0\n", tables)
        srv.wait_log("VM template ready")
        results["clone"] = srv.latencies(N)
        lines.append(summary(f"clone per run (pool_size = 0){tag}", results["clone"]))
        tps["clone"] = srv.throughput(THROUGHPUT_RUNS)
        srv.stop()
    for label, tables in variants:
        tag = f" [{label}]" if label else ""
        results, lines, tps, pss = out[label]
        srv = Server(f"pooled{label}", "", tables)
        srv.wait_log("warm pool ready")
        time.sleep(2)
        pss.extend(srv.pooled_pss())
        results["pooled"] = srv.latencies(N, spacing=POOLED_SPACING)
        lines.append(summary(f"pooled (default config){tag}", results["pooled"]))
        tps["pooled"] = srv.throughput(THROUGHPUT_RUNS)
        srv.stop()
    return out


def report(label, data):
    results, lines, tps, pss = data
    tag = f" [{label}]" if label else ""
    cold50, pooled50 = statistics.median(results["cold"]), statistics.median(results["pooled"])
    for line in lines:
        print(line)
    print(f"{'speed-up pooled vs cold (p50)':34s} {cold50 / pooled50:.1f}x{tag}")
    print(f"{'throughput, concurrency 4, pooled':34s} {tps['pooled']:.2f} runs/s ({THROUGHPUT_RUNS} runs){tag}")
    print(f"{'throughput, concurrency 4, clone':34s} {tps['clone']:.2f} runs/s ({THROUGHPUT_RUNS} runs){tag}")
    if pss:
        avg = lambda k: sum(r.get(k, 0) for r in pss) / len(pss) / 1024
        print(f"{'PSS per idle pooled VM':34s} {avg('Pss'):.1f} MiB (anon {avg('Pss_Anon'):.1f}, file "
              f"{avg('Pss_File'):.1f}; RSS {avg('Rss'):.1f}; {len(pss)} VMs){tag}")
    else:
        print(f"PSS per idle pooled VM: no pooled VMs found{tag}")


if JAIL_COST:
    variants = [("unjailed", UNJAILED), ("jailed", "")]
elif SCRATCH_COST:
    variants = [("tmpfs", "upper_disk = false\n"), ("disk", "")]
else:
    variants = [("", "")]
data = measure(variants)
print()
print(f"Fast start: client-side spawn -> completion of `true` on busybox (contree-client), {time.strftime('%F %T')}")
for label, _ in variants:
    report(label, data[label])
if JAIL_COST:
    (free, _, free_tp, _), (jailed, _, jailed_tp, _) = data["unjailed"], data["jailed"]
    print("jail cost (jailed / unjailed):")
    for mode in ("cold", "clone", "pooled"):
        p50 = statistics.median(jailed[mode]) / statistics.median(free[mode])
        p95 = pct(jailed[mode], 95) / pct(free[mode], 95)
        print(f"  {mode:8s} latency p50 x{p50:.2f}  p95 x{p95:.2f}")
    for mode in ("clone", "pooled"):
        print(f"  {mode:8s} throughput x{jailed_tp[mode] / free_tp[mode]:.2f}")
if SCRATCH_COST:
    (ram, _, _, _), (disk, _, _, _) = data["tmpfs"], data["disk"]
    print("scratch disk cost (writable layer on its disk - in guest RAM), p50:")
    for mode in ("cold", "clone", "pooled"):
        added = statistics.median(disk[mode]) - statistics.median(ram[mode])
        print(f"  {mode:8s} {added:+6.0f} ms (target for pooled: <= 10 ms)")
