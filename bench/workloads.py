"""Real-workload benchmark driver (run by bench/workloads.sh): one Boxwood server with the
Python image imported as python:3.11; every number comes from this run on this machine.

  pip      `pip install flask` in a run (persisted, through the guest's network) vs the same
           command in a fresh local venv on the host: the TCG slowdown, for the record
  persist  a run writing 500 MiB (random) persisted vs the same run disposable: the extra time
           is the persist (export, unpack, erofs, publish); next to a `cp` of 500 MiB on the
           host (target: persist <= 1.5x cp), with the server's own split of it (export with
           the layer written alongside, then publish)

WORKLOADS=persist runs only the second part.
"""

import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

BIN, WORK, LAYOUT, N = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
MIB = 500


class Server:
    def __init__(self, config):
        cfg = os.path.join(WORK, "workloads.toml")
        with open(cfg, "w") as f:
            f.write(config)
        self.out_path, log_path = os.path.join(WORK, "server.out"), os.path.join(WORK, "server.log")
        self.log_path = log_path
        env = dict(os.environ, RUST_LOG="info,boxwood_core::runner::persist=debug,boxwood_image=debug")
        self.proc = subprocess.Popen(
            [BIN, "--log-format", "json", "serve", "--config", cfg, "--state-dir", os.path.join(WORK, "state"),
             "--listen", "127.0.0.1:0"],
            stdout=open(self.out_path, "w"), stderr=open(log_path, "w"), env=env)
        for _ in range(600):
            text = open(self.out_path).read()
            m1, m2 = re.search(r"^BOXWOOD_URL=(.*)$", text, re.M), re.search(r"^BOXWOOD_TOKEN=(.*)$", text, re.M)
            if m1 and m2:
                self.url, self.token = m1.group(1), m2.group(1)
                return
            if self.proc.poll() is not None:
                raise SystemExit(f"server exited:\n{open(log_path).read()[-3000:]}")
            time.sleep(0.2)
        raise SystemExit("server did not start")

    def call(self, method, path, body=None):
        req = urllib.request.Request(self.url + path, method=method,
                                     data=None if body is None else json.dumps(body).encode(),
                                     headers={"Authorization": f"Bearer {self.token}",
                                              "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=3600) as r:
            return json.loads(r.read() or b"null")

    def wait(self, uuid):
        while True:
            op = self.call("GET", f"/v1/operations/{uuid}")
            if op["status"] in ("SUCCESS", "FAILED", "CANCELLED"):
                return op
            time.sleep(0.2)

    def run(self, body):
        """Runs to completion: (operation, wall seconds from spawn to completion)."""
        t0 = time.monotonic()
        op = self.wait(self.call("POST", "/v1/instances", body)["uuid"])
        dt = time.monotonic() - t0
        state = (op.get("metadata") or {}).get("result", {}).get("state", {})
        if op["status"] != "SUCCESS" or state.get("exit_code") != 0:
            raise SystemExit(f"run failed: {json.dumps(op)[:3000]}")
        return op, dt

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=120)


def host_cas():
    d = "/usr/local/share/ca-certificates"
    return sorted(os.path.join(d, f) for f in os.listdir(d) if f.endswith(".crt")) if os.path.isdir(d) else []


def pip_on_host():
    with tempfile.TemporaryDirectory() as venv:
        subprocess.run([sys.executable, "-m", "venv", venv], check=True)
        t0 = time.monotonic()
        subprocess.run([os.path.join(venv, "bin", "pip"), "install", "--quiet", "--no-cache-dir", "flask"], check=True)
        return time.monotonic() - t0


def cp_on_host():
    with tempfile.TemporaryDirectory(dir=WORK) as d:
        src, dst = os.path.join(d, "src"), os.path.join(d, "dst")
        with open(src, "wb") as f:
            f.write(os.urandom(MIB << 20))
        os.sync()
        t0 = time.monotonic()
        subprocess.run(["cp", src, dst], check=True)
        os.sync()
        return time.monotonic() - t0


layout_dir = os.path.dirname(LAYOUT)
cas = ", ".join(json.dumps(c) for c in host_cas())
srv = Server(f'[vm]\naccel = "tcg"\nextra_ca_certs = [{cas}]\n[registry]\nlocal_dirs = ["{layout_dir}"]\n')
try:
    imp = srv.call("POST", "/v1/images/import", {"registry": {"url": f"oci:{LAYOUT}:3.11"}, "tag": "python:3.11"})
    if srv.wait(imp["uuid"])["status"] != "SUCCESS":
        raise SystemExit("importing the Python image failed")
    py = "tag:python:3.11"

    pip_vm, pip_host = [], []
    for _ in range(N if os.environ.get("WORKLOADS", "all") == "all" else 0):
        op, _ = srv.run({"command": "pip install --quiet --no-cache-dir flask", "shell": True, "image": py,
                         "disposable": False, "timeout": 1800})
        pip_vm.append(op["duration"])
        pip_host.append(pip_on_host())

    write = f"head -c {MIB << 20} /dev/urandom > /blob && sync"
    kept, thrown, cps = [], [], []
    for _ in range(N):
        # Each measurement starts with the host's writeback done, as the cp's does: the
        # previous one's dirty pages would otherwise throttle this one's writes.
        os.sync()
        _, t = srv.run({"command": write, "shell": True, "image": py, "disposable": False, "timeout": 1800})
        kept.append(t)
        os.sync()
        _, t = srv.run({"command": write, "shell": True, "image": py, "disposable": True, "timeout": 1800})
        thrown.append(t)
        cps.append(cp_on_host())
finally:
    srv.stop()

phases = []
for line in open(srv.log_path):
    try:
        fields = json.loads(line).get("fields", {})
    except ValueError:
        continue
    if fields.get("message") == "persist phases" and fields.get("entries", 0) > 0:
        phases.append((fields["export_and_unpack_ms"] / 1e3, fields["publish_ms"] / 1e3, fields.get("bytes", 0)))

med = statistics.median
persist = max(med(kept) - med(thrown), 0.0)
print()
print(f"Workloads on python:3.11 (TCG), medians of {N}, {time.strftime('%F %T')}")
if pip_vm:
    print(f"{'pip install flask: Boxwood run':40s} {med(pip_vm):7.1f} s")
    print(f"{'pip install flask: host venv':40s} {med(pip_host):7.1f} s   ratio x{med(pip_vm) / med(pip_host):.1f} (TCG)")
print(f"{f'{MIB} MiB run, persisted':40s} {med(kept):7.1f} s")
print(f"{f'{MIB} MiB run, disposable':40s} {med(thrown):7.1f} s")
print(f"{'persist cost (difference)':40s} {persist:7.2f} s")
big = [p for p in phases if p[2] >= MIB << 20]
if big:
    print(f"{'  of it: export, layer written alongside':40s} {med(p[0] for p in big):7.2f} s")
    print(f"{'  of it: publish (flush, hash, rename)':40s} {med(p[1] for p in big):7.2f} s")
    split = med(p[0] + p[1] for p in big)
    print(f"{'  the two together':40s} {split:7.2f} s   x{split / med(cps):.2f} of the cp below")
print(f"{f'cp of {MIB} MiB on the host':40s} {med(cps):7.2f} s   persist/cp x{persist / med(cps):.2f} (target <= 1.5)")
