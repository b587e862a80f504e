#!/usr/bin/env python
"""Upstream HTTP clients inside the bare proxy, with and without a gateway's worth of Python per request.

    python bench/upstream_clients.py [--clients pyreqwest,aiohttp,h1] [--spins 0,180] [--rounds 3]

The bare pass-through proxy of bench/http_stack.py (uvicorn + raw ASGI) pinned to core 0, wrk and the fake
upstream on core 1, 16 connections.  HB_SPIN_US burns that many µs of Python per request before the upstream
call, standing in for a gateway's stages: a client whose cost depends on how busy the loop's thread is (a
runtime thread that must be woken per request) shows it there.  Prints req/s and CPU µs per request (all
threads of the proxy), median of alternating rounds.  README, "Hot-path dependencies", quotes one run.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import perf_bench as pb  # noqa: E402

hs = pb.hs


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", default="pyreqwest,aiohttp,h1")
    ap.add_argument("--spins", default="0,180")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--requests", type=int, default=4000)
    a = ap.parse_args()
    pb.split_cores()
    tmp = tempfile.mkdtemp(prefix="helixclients-")
    up_port = hs.free_port()
    up = hs.start([pb.PY, "-c", f"import http_stack as h; h.run_upstream({up_port})"], {})
    procs = [up]
    try:
        up_url = f"http://127.0.0.1:{up_port}{pb.PATH}"
        hs.wait_ready(up_url, up)
        targets = {}
        for c in a.clients.split(","):
            for s in a.spins.split(","):
                port = hs.free_port()
                p = hs.start(pb.pinned(hs.gateway_cmd("uvicorn", port)),
                             {"HB_CLIENT": c, "HB_UPSTREAM": up_url, "HB_SPIN_US": s})
                targets[(c, s)] = pb.Target(f"{c}+{s}", p, port)
                procs.append(p)
        for t in targets.values():
            t.wait()
        res: dict[tuple[str, str], list[dict]] = {k: [] for k in targets}
        keys = list(targets)
        for rnd in range(a.rounds):
            for k in keys if rnd % 2 == 0 else reversed(keys):
                r = pb.measure(targets[k], pb.BODY, a.requests, 500, 16, tmp, [])
                res[k].append(r)
                print(f"[{rnd + 1}] {k[0]:10s} +{k[1]:>4s} µs  {r['rps']:7.0f} req/s  {r['cpu']:6.0f} µs/req",
                      file=sys.stderr, flush=True)
        print("| client | Python burnt per request | req/s | CPU µs/request |\n|---|---:|---:|---:|")
        for k in keys:
            print(f"| {k[0]} | {k[1]} µs | {pb.med(res[k], 'rps'):.0f} | {pb.med(res[k], 'cpu'):.0f} |")
    finally:
        for p in procs:
            hs.stop(p)
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
