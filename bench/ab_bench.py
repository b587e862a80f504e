#!/usr/bin/env python
"""A/B of gateway CPU per request between source trees, side by side in one run, against the bare proxy.

    python bench/ab_bench.py --src A=/tmp/base/src --src B=src [--rows default,full,hit,s20] [--rounds 5]

Each tree's `helixagent serve` runs with perf_bench's configs (default stages; every stage with a real cache
miss; a memory-cache hit; a 20-chunk stream), pinned to core 0 like `make bench`; rounds alternate their
order.  Prints the median CPU µs/request per tree and row, and each row's ratio to the bare pass-through,
then the minimum of the rounds (on a noisy shared host the least-disturbed round; contention only adds).
The tool for "what did this change buy": `make bench` remains the full report against issue 16's targets.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import perf_bench as pb  # noqa: E402

hs = pb.hs


def serve(name: str, src: str, cfg: str, bearer: str = "sk-client-test") -> pb.Target:
    port = hs.free_port()
    p = hs.start(pb.pinned([pb.PY, "-m", "helixagent", "serve", "--config", cfg, "--port", str(port)]),
                 {"PYTHONPATH": os.path.abspath(src)})
    return pb.Target(name, p, port, bearer)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--src", action="append", required=True, help="NAME=path/to/src (repeat)")
    ap.add_argument("--rows", default="default,full,hit")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--requests", type=int, default=4000)
    ap.add_argument("--warmup", type=int, default=500)
    ap.add_argument("--conns", type=int, default=16)
    a = ap.parse_args()
    pb.split_cores()
    srcs = [s.split("=", 1) for s in a.src]
    rows = a.rows.split(",")
    tmp = tempfile.mkdtemp(prefix="helixab-")
    up_port = hs.free_port()
    up = hs.start([pb.PY, "-c", f"import http_stack as h; h.run_upstream({up_port})"], {"HB_STREAM_DELAY": "0.0005"})
    procs = [up]
    try:
        up_url = f"http://127.0.0.1:{up_port}{pb.PATH}"
        hs.wait_ready(up_url, up)
        targets: dict[str, pb.Target] = {"bare": pb.bare(up_url)}
        for name, src in srcs:
            env = {**os.environ, "PYTHONPATH": os.path.abspath(src)}
            if "default" in rows or "s20" in rows:
                targets[f"{name}:default"] = serve(name, src, pb.config(os.path.join(tmp, name, "default"), up_port))
            if "full" in rows or "hit" in rows:
                fcfg = pb.config(os.path.join(tmp, name, "full"), up_port, full=True)
                subprocess.run([pb.PY, "-m", "helixagent", "migrate", "up", "--config", fcfg], check=True,
                               capture_output=True, env=env)
                key = json.loads(subprocess.run(
                    [pb.PY, "-m", "helixagent", "keys", "create", "--config", fcfg, "--user", "bench", "--app", "bench",
                     "--role", "user", "--json"], check=True, capture_output=True, text=True, env=env).stdout)["key"]
                targets[f"{name}:full"] = serve(name, src, fcfg, key)
        procs += [t.proc for t in targets.values()]
        for t in targets.values():
            t.wait()
        bodies = {"default": pb.BODY, "full": pb.MISS, "hit": pb.HIT_BODY, "s20": pb.S20}
        plan = [("bare", "bare", "default")]
        if "s20" in rows:
            plan.append(("bare", "bare", "s20"))
        for name, _ in srcs:
            for r in rows:
                plan.append((name, f"{name}:{'full' if r in ('full', 'hit') else 'default'}", r))
        res: dict[tuple[str, str], list[dict]] = {(n, r): [] for n, _, r in plan}
        for rnd in range(a.rounds):
            order = plan if rnd % 2 == 0 else list(reversed(plan))
            for name, tgt, r in order:
                n, w = (a.requests // 4, a.warmup // 4) if r == "s20" else (a.requests, a.warmup)
                m = pb.measure(targets[tgt], bodies[r], n, w, a.conns, tmp, [])
                res[(name, r)].append(m)
                print(f"[{rnd + 1}] {name:8s} {r:8s} {m['cpu']:7.0f} µs/req  {m['rps']:6.0f} req/s err {m['errors']}",
                      file=sys.stderr, flush=True)
        bare = pb.med(res[("bare", "default")], "cpu")
        print(f"\nbare: {bare:.0f} µs/req" + (f", bare s20 {pb.med(res[('bare', 's20')], 'cpu'):.0f}" if "s20" in rows else ""))
        print("| row | " + " | ".join(n for n, _ in srcs) + " |")
        print("|---|" + "---:|" * len(srcs))
        for r in rows:
            cells = []
            for n, _ in srcs:
                c = pb.med(res[(n, r)], "cpu")
                cells.append(f"{c:.0f} ({c / bare:.2f}×)")
            print(f"| {r} | " + " | ".join(cells) + " |")
        lo = min(m["cpu"] for m in res[("bare", "default")])
        print(f"\nminimum of the rounds: bare {lo:.0f} µs/req")
        print("| row | " + " | ".join(n for n, _ in srcs) + " |")
        print("|---|" + "---:|" * len(srcs))
        for r in rows:
            cells = []
            for n, _ in srcs:
                c = min(m["cpu"] for m in res[(n, r)])
                cells.append(f"{c:.0f} ({c / lo:.2f}×)")
            print(f"| {r} | " + " | ".join(cells) + " |")
        # RSS of each tree's gateways after every round (perf_bench's "after warm-up", every stage on: :full)
        print("\nRSS after the rounds, MB: " + ", ".join(
            f"{k} {pb.rss_mb(t.proc.pid):.1f}" for k, t in targets.items() if k != "bare"))
    finally:
        for p in procs:
            hs.stop(p)
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
