#!/usr/bin/env python
"""Instructions per request under callgrind: a deterministic A/B for a noisy shared host.

    python bench/instr_bench.py --src A=/tmp/before/src --src B=src [--rows default,full,hit] [--requests 1000]
    python bench/instr_bench.py --bare        # the bare pass-through proxy (uvicorn + raw ASGI + h1)
    python bench/instr_bench.py --src HEAD=src --rows default --keep /tmp/cg   # and keep the dumps:
    callgrind_annotate --inclusive=no /tmp/cg/callgrind.HEAD-default.out | head -60

CPU seconds per request move 15-30% between runs on these machines; valgrind's instruction count of the
same code and load does not (the same total twice, whatever else runs).  Each gateway runs under
``valgrind --tool=callgrind``; after a warm-up of 300 requests the counters are zeroed
(``callgrind_control -z``), N requests are sent (wrk, 4 connections), the counters dumped, and the
user-space instructions divided by the requests.  What it does not see: time in the kernel (system calls,
the loopback TCP path), which `strace -c -f -p PID` counts per request instead.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import perf_bench as pb  # noqa: E402

hs = pb.hs


def measure(name: str, cmd: list[str], env: dict[str, str], port: int, bearer: str, body: bytes, n: int,
            tmp: str, keep: str | None = None) -> float:
    out = os.path.join(tmp, f"cg-{name}.out")
    with open(os.path.join(tmp, f"{name}.err"), "w") as err:
        p = subprocess.Popen(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", "--dump-instr=no", *cmd],
                             env=env, stdout=subprocess.DEVNULL, stderr=err)
    try:
        t = pb.Target(name, p, port, bearer)
        deadline = time.monotonic() + 600
        while True:
            try:
                t.wait()
                break
            except RuntimeError:
                if p.poll() is not None or time.monotonic() > deadline:
                    raise
        unique = body is pb.MISS
        wire = pb.BODY if unique else body

        def run(k: int) -> dict:
            return pb.with_bearer(t, lambda: hs.run_wrk(t.url, wire, k, 4, tmp), unique=unique)
        run(300)
        subprocess.run(["callgrind_control", "-z", str(p.pid)], check=True, capture_output=True)
        r = run(n)
        subprocess.run(["callgrind_control", "-d", str(p.pid)], check=True, capture_output=True)
        time.sleep(1)
        dumps = sorted(glob.glob(out + ".*"), key=os.path.getmtime)
        if keep:  # the measured dump, for callgrind_annotate (self cost by function, callers, callees)
            os.makedirs(keep, exist_ok=True)
            shutil.copy(dumps[-1], os.path.join(keep, f"callgrind.{name}.out"))
        for line in open(dumps[-1]):
            if line.startswith(("summary:", "totals:")):
                return int(line.split()[1]) / r["requests"]
        raise RuntimeError(f"{name}: no totals in {dumps[-1]}")
    finally:
        p.kill()
        p.wait()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--src", action="append", default=[], help="NAME=path/to/src (repeat)")
    ap.add_argument("--rows", default="default,full,hit")
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--bare", action="store_true", help="also the bare pass-through proxy")
    ap.add_argument("--keep", metavar="DIR", help="copy each measured callgrind dump to DIR")
    a = ap.parse_args()
    if shutil.which("valgrind") is None or shutil.which("wrk") is None:
        print("needs valgrind and wrk (apt-get install -y valgrind wrk)", file=sys.stderr)
        return 2
    tmp = tempfile.mkdtemp(prefix="helixinstr-")
    up_port = hs.free_port()
    up = hs.start([pb.PY, "-c", f"import http_stack as h; h.run_upstream({up_port})"], {})
    bodies = {"default": pb.BODY, "full": pb.MISS, "hit": pb.HIT_BODY, "s20": pb.S20}
    results: dict[tuple[str, str], float] = {}
    try:
        up_url = f"http://127.0.0.1:{up_port}{pb.PATH}"
        hs.wait_ready(up_url, up)
        if a.bare:
            port = hs.free_port()
            env = {**os.environ, "HB_CLIENT": "h1", "HB_UPSTREAM": up_url,
                   "PYTHONPATH": f"{HERE}:{os.path.join(os.path.dirname(HERE), 'src')}"}
            results[("bare", "default")] = measure("bare", hs.gateway_cmd("uvicorn", port), env, port,
                                                   "sk-client-test", pb.BODY, a.requests, tmp, a.keep)
        for spec in a.src:
            name, src = spec.split("=", 1)
            env = {**os.environ, "PYTHONPATH": os.path.abspath(src)}
            for row in a.rows.split(","):
                full = row in ("full", "hit")
                cfg = pb.config(os.path.join(tmp, name, row), up_port, full=full)
                bearer = "sk-client-test"
                if full:
                    subprocess.run([pb.PY, "-m", "helixagent", "migrate", "up", "--config", cfg], check=True,
                                   capture_output=True, env=env)
                    bearer = json.loads(subprocess.run(
                        [pb.PY, "-m", "helixagent", "keys", "create", "--config", cfg, "--user", "bench", "--app",
                         "bench", "--role", "user", "--json"], check=True, capture_output=True, text=True,
                        env=env).stdout)["key"]
                port = hs.free_port()
                cmd = [pb.PY, "-m", "helixagent", "serve", "--config", cfg, "--port", str(port)]
                results[(name, row)] = measure(f"{name}-{row}", cmd, env, port, bearer, bodies[row], a.requests, tmp, a.keep)
                print(f"{name:8s} {row:8s} {results[(name, row)] / 1000:8.1f} k instructions/request",
                      file=sys.stderr, flush=True)
        print("| tree | row | k instructions/request |")
        print("|---|---|---:|")
        for (name, row), v in results.items():
            print(f"| {name} | {row} | {v / 1000:.1f} |")
    finally:
        hs.stop(up)
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
