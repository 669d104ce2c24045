"""Soak driver (run by bench/soak.sh): one Boxwood server with retention on, driven through
a long mix of runs; every number comes from this run on this machine.

Each round of 10 runs: 5 disposable runs, 2 persisted runs fanned out from the base image
(each writes 1 MiB of random data), 2 persisted steps of one chain (each on the previous
step's result, writing 1 MiB), 1 run with an uploaded 64 KiB file. Every 100 runs it prints
the state dir's allocated bytes, the server's RSS and run latency; every 200 runs it asks for
a retention pass (`boxwood gc`) while runs go on.

At the end it prints, as ratios against baselines measured here:
  * disk per persisted 1 MiB change, once compaction settled, along the chain and across the
    fan-out (target <= 1.5)
  * state-dir bytes per 100 runs before and after retention passes
  * server RSS at the end / at the start
  * run latency p50 while a retention pass runs / p50 otherwise (the GC pause effect)
"""

import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.request

BIN, WORK, RUNS, MAX_SECS = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
STATE_PARENT = sys.argv[5] if len(sys.argv) > 5 else WORK
MIB = 1 << 20
STATE = os.path.join(STATE_PARENT, "state")
# On a filesystem of its own (SOAK_FS), disk is what that filesystem has in use: summing the
# files' blocks would count each reflink-shared extent once per file sharing it.
OWN_FS = os.path.ismount(STATE_PARENT)
# Fan-out results are untagged leaves nobody uses again: retention takes them after this long.
IMAGE_DAYS = float(os.environ.get("SOAK_IMAGE_DAYS", "0.002"))


class Server:
    def __init__(self):
        cfg = os.path.join(WORK, "soak.toml")
        with open(cfg, "w") as f:
            f.write("[core.retention]\n"
                    f"images_after_days = {IMAGE_DAYS}\n"
                    "uploads_after_days = 180\n"
                    f"operations_after_days = {IMAGE_DAYS}\n"
                    "interval_secs = 0\n")
        out_path, self.log_path = os.path.join(WORK, "server.out"), os.path.join(WORK, "server.log")
        self.proc = subprocess.Popen(
            [BIN, "serve", "--config", cfg, "--state-dir", STATE, "--listen", "127.0.0.1:0"],
            stdout=open(out_path, "w"), stderr=open(self.log_path, "w"))
        for _ in range(900):
            text = open(out_path).read()
            m1, m2 = re.search(r"^BOXWOOD_URL=(.*)$", text, re.M), re.search(r"^BOXWOOD_TOKEN=(.*)$", text, re.M)
            if m1 and m2:
                self.url, self.token = m1.group(1), m2.group(1)
                return
            if self.proc.poll() is not None:
                raise SystemExit(f"server exited:\n{open(self.log_path).read()[-3000:]}")
            time.sleep(0.2)
        raise SystemExit("server did not start")

    def call(self, method, path, body=None, data=None, ctype="application/json"):
        payload = data if data is not None else (None if body is None else json.dumps(body).encode())
        req = urllib.request.Request(self.url + path, method=method, data=payload,
                                     headers={"Authorization": f"Bearer {self.token}", "Content-Type": ctype})
        with urllib.request.urlopen(req, timeout=3600) as r:
            return json.loads(r.read() or b"null")

    def run(self, body):
        started = time.monotonic()
        op = self.call("POST", "/v1/instances", body)
        while True:
            op = self.call("GET", f"/v1/operations/{op['uuid']}")
            if op["status"] in ("SUCCESS", "FAILED", "CANCELLED"):
                break
            time.sleep(0.1)
        if op["status"] != "SUCCESS":
            raise SystemExit(f"run failed: {json.dumps(op)[:2000]}")
        return op, time.monotonic() - started

    def rss_bytes(self):
        with open(f"/proc/{self.proc.pid}/status") as f:
            return int(re.search(r"^VmRSS:\s+(\d+) kB", f.read(), re.M).group(1)) * 1024

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=120)


def allocated(path):
    if OWN_FS:
        st = os.statvfs(STATE_PARENT)
        return (st.f_blocks - st.f_bfree) * st.f_frsize
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
            except FileNotFoundError:
                pass
    return total


def layer_count():
    try:
        return len(os.listdir(os.path.join(STATE, "images", "layers")))
    except FileNotFoundError:
        return 0


def settle():
    """Waits until background compactions and sweeps leave the layer files alone for 3 s."""
    last, quiet_since = (layer_count(), allocated(STATE)), time.monotonic()
    while time.monotonic() - quiet_since < 3:
        time.sleep(0.5)
        now = (layer_count(), allocated(STATE))
        if now != last:
            last, quiet_since = now, time.monotonic()


def gc():
    out = subprocess.run([BIN, "gc", "--json", "--state-dir", STATE], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def p(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def write_mib(path):
    return f"head -c {MIB} /dev/urandom > {path}"


def main():
    server = Server()
    deadline = time.monotonic() + MAX_SECS
    base = "tag:busybox:latest"
    # Warm up (template, pool) before anything is measured.
    for _ in range(3):
        server.run({"command": "true", "shell": True, "image": base, "disposable": True})
    settle()
    rss_start, disk_start = server.rss_bytes(), allocated(STATE)

    # Baselines for the cost of a persisted 1 MiB change: 10 fan-out children, then 10 chain
    # steps, each measured once compaction settled.
    def persisted_cost(chain):
        nonlocal tip
        before = allocated(STATE)
        for i in range(10):
            image = tip if chain else base
            op, _ = server.run({"command": write_mib(f"/data-{time.time_ns()}"), "shell": True, "image": image})
            if chain:
                tip = op["result_image_uuid"]
        settle()
        return (allocated(STATE) - before) / (10 * MIB)

    tip = base
    fanout_cost = persisted_cost(chain=False)
    chain_cost = persisted_cost(chain=True)
    print(f"disk per persisted 1 MiB change: fan-out {fanout_cost:.2f}x, chain {chain_cost:.2f}x (target <= 1.5)")

    upload = server.call("POST", "/v1/files", data=os.urandom(64 * 1024), ctype="application/octet-stream")
    latencies, in_gc = [], []
    gc_running = threading.Event()
    gc_reports, gc_failures, checkpoints = [], [], []
    done = 0
    print(f"{'runs':>6} {'state MiB':>10} {'MiB/100 runs':>13} {'RSS MiB':>8} {'p50 s':>6} {'p95 s':>6}")
    last_disk = loop_start = allocated(STATE)
    while done < RUNS and time.monotonic() < deadline:
        bodies = [{"command": "echo hi", "shell": True, "image": base, "disposable": True}] * 5
        bodies += [{"command": write_mib(f"/f-{done}-{i}"), "shell": True, "image": base} for i in range(2)]
        bodies += [{"command": "cat /opt/blob | wc -c", "shell": True, "image": base, "disposable": True,
                    "files": {"/opt/blob": {"uuid": upload["uuid"]}}}]
        for body in bodies:
            op, secs = server.run(body)
            latencies.append(secs)
            in_gc.append(gc_running.is_set())
        for j in range(2):
            op, secs = server.run({"command": write_mib(f"/c-{done}-{j}"), "shell": True, "image": tip})
            tip = op["result_image_uuid"]
            latencies.append(secs)
            in_gc.append(gc_running.is_set())
        done += 10
        if done % 100 == 0:
            disk = allocated(STATE)
            recent = latencies[-100:]
            checkpoints.append((done, disk))
            print(f"{done:>6} {disk / MIB:>10.1f} {(disk - last_disk) / MIB:>13.1f} {server.rss_bytes() / MIB:>8.1f} "
                  f"{p(recent, 0.5):>6.2f} {p(recent, 0.95):>6.2f}", flush=True)
            last_disk = disk
        if done % 200 == 0:  # after the checkpoint, so the first one is GC-free
            gc_running.set()

            def pass_():
                try:
                    gc_reports.append(gc())
                except subprocess.CalledProcessError as e:
                    gc_failures.append(e.stderr.strip())
                    print(f"retention pass failed: {e.stderr.strip()}", flush=True)
                finally:
                    gc_running.clear()
            threading.Thread(target=pass_, daemon=True).start()

    while gc_running.is_set():
        time.sleep(0.5)
    settle()
    final = gc()
    settle()
    disk_end, rss_end = allocated(STATE), server.rss_bytes()
    during = [x for x, g in zip(latencies, in_gc) if g]
    outside = [x for x, g in zip(latencies, in_gc) if not g]
    removed = sum(len(r["images"]) for r in gc_reports + [final])
    print(f"runs: {done} in {len(latencies)} timed runs; retention passes: {len(gc_reports) + 1} "
          f"({len(gc_failures)} more failed), images removed {removed}")
    first = [disk for n, disk in checkpoints if n == 200]
    if first:
        print(f"state dir per 100 runs: +{(first[0] - loop_start) / 2 / MIB:.1f} MiB over the first 200 (no pass yet), "
              f"+{(disk_end - loop_start) / (done / 100) / MIB:.1f} MiB over all {done} after the last pass")
    print(f"state dir: {disk_start / MIB:.1f} MiB after warm-up, {disk_end / MIB:.1f} MiB at the end")
    print(f"server RSS: {rss_start / MIB:.1f} MiB at start, {rss_end / MIB:.1f} MiB at the end: {rss_end / rss_start:.2f}x")
    if during and outside:
        print(f"run p50 during retention passes / otherwise: {p(during, 0.5):.2f} s / {p(outside, 0.5):.2f} s "
              f"= {p(during, 0.5) / p(outside, 0.5):.2f}x ({len(during)} runs overlapped a pass)")
    else:
        print("no run overlapped a retention pass (passes were too quick to meet one)")
    print(f"last pass: {final['seconds']:.3f} s, {len(final['images'])} images, {final['layer_files']} layer files")
    server.stop()


if __name__ == "__main__":
    main()
