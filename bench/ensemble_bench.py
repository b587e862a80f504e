#!/usr/bin/env python
"""The gateway's own CPU per ensemble request (3 members, non-streamed and streamed) beside a single request's.

    this script (httpx, C concurrent requests) -> HelixAgent (`helixagent serve`, 1 worker) -> fast fake upstream
                                                  (bench/http_stack.py run_upstream: canned answers, keep-alive)

Three providers point at the same fake upstream, so every member answers the same text.  CPU is the gateway
process's own accounting (/proc/<pid>/stat utime+stime over the measured phase) divided by the requests
answered; every figure is the median of alternating rounds (these machines are shared and noisy: the ratio
within one run is what matters).  Records go to SQLite (one parent + one record per member call).

Scenarios: a single chat request; an ensemble of 3 with confidence_weighted (waits for all three members);
the same ensemble streamed; a majority ensemble (decided after two agreeing answers, the third cancelled).

Usage: python bench/ensemble_bench.py [--requests 600] [--rounds 3] [--conns 8] [--out bench/results/ensemble.md]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import tempfile
import time

import httpx
import orjson

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import http_stack as hs  # noqa: E402  (the shared fake upstream and CPU accounting)

PY = sys.executable


def write_config(path: str, up: int) -> None:
    provs = "\n".join(f"""  - name: p{i}
    type: openai_compatible
    base_url: http://127.0.0.1:{up}/v1
    api_key: sk-upstream-test
    models: [gpt-4o-mini]
    max_retries: 0""" for i in (1, 2, 3))
    with open(path, "w") as f:
        f.write(f"""
logging: {{level: warning, format: json}}
providers:
{provs}
http: {{max_idle_conns: 256, max_conns_per_host: 256, idle_conn_timeout: 90s}}
database: {{url: "sqlite:///{os.path.dirname(path)}/bench.db", spool_dir: "{os.path.dirname(path)}/spool"}}
""")


def bodies() -> dict[str, tuple[str, bytes]]:
    base = dict(hs.REQUEST_OBJ)
    ens = {"providers": ["p1", "p2", "p3"], "strategy": "confidence_weighted"}
    return {
        "single": ("/v1/chat/completions", orjson.dumps({**base, "model": "p1/gpt-4o-mini"})),
        "ensemble": ("/v1/ensemble/completions", orjson.dumps({**base, "ensemble_config": ens})),
        "ensemble_stream": ("/v1/ensemble/completions", orjson.dumps({**base, "stream": True, "ensemble_config": ens})),
        "majority": ("/v1/ensemble/completions", orjson.dumps(
            {**base, "ensemble_config": {**ens, "strategy": "majority", "min_providers": 2}})),
    }


async def drive(url: str, body: bytes, n: int, conns: int) -> tuple[int, int, list[float]]:
    ok = err = 0
    lat: list[float] = []
    sem = asyncio.Semaphore(conns)
    limits = httpx.Limits(max_connections=conns, max_keepalive_connections=conns)
    async with httpx.AsyncClient(timeout=30, limits=limits) as c:
        async def one() -> None:
            nonlocal ok, err
            async with sem:
                t0 = time.perf_counter()
                try:
                    r = await c.post(url, content=body, headers={"content-type": "application/json"})
                    _ = r.content
                    if r.status_code == 200 and b'"error"' not in r.content[-400:]:
                        ok += 1
                    else:
                        err += 1
                except httpx.HTTPError:
                    err += 1
                lat.append(time.perf_counter() - t0)
        await asyncio.gather(*(one() for _ in range(n)))
    return ok, err, lat


def measure(url: str, gw_pid: int, body: bytes, n: int, conns: int) -> dict[str, float]:
    asyncio.run(drive(url, body, max(20, n // 10), conns))  # warm-up
    time.sleep(0.2)
    g0 = hs.tree_cpu_seconds(gw_pid)
    t0 = time.perf_counter()
    ok, err, lat = asyncio.run(drive(url, body, n, conns))
    dur = time.perf_counter() - t0
    g1 = hs.tree_cpu_seconds(gw_pid)
    lat.sort()
    return {"cpu_us": (g1 - g0) / max(ok, 1) * 1e6, "rps": ok / dur, "p50_ms": lat[len(lat) // 2] * 1000,
            "errors": err}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=600)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--conns", type=int, default=8)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "ensemble.md"))
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="helixens-")
    up_port = hs.free_port()
    up = hs.start([PY, "-c", f"import http_stack as h; h.run_upstream({up_port})"], {"HB_STREAM_DELAY": "0"})
    procs = [up]
    try:
        hs.wait_ready(f"http://127.0.0.1:{up_port}/v1/chat/completions", up)
        cfg = os.path.join(tmp, "ens.yaml")
        write_config(cfg, up_port)
        subprocess_env = {"PYTHONPATH": os.path.join(ROOT, "src")}
        port = hs.free_port()
        gw = hs.start([PY, "-m", "helixagent", "serve", "--config", cfg, "--port", str(port)], subprocess_env)
        procs.append(gw)
        base = f"http://127.0.0.1:{port}"
        hs.wait_ready(base + "/v1/chat/completions", gw)
        sc = bodies()
        res: dict[str, list[dict[str, float]]] = {k: [] for k in sc}
        for rnd in range(args.rounds):
            order = list(sc) if rnd % 2 == 0 else list(reversed(sc))
            for name in order:
                path, body = sc[name]
                res[name].append(measure(base + path, gw.pid, body, args.requests, args.conns))
        med = {k: {m: statistics.median(r[m] for r in v) for m in v[0]} for k, v in res.items()}
        single = med["single"]["cpu_us"]
        labels = {"single": "one chat request (pinned provider)",
                  "ensemble": "ensemble of 3, confidence_weighted (3 member calls + 4 records)",
                  "ensemble_stream": "the same ensemble, streamed",
                  "majority": "ensemble of 3, majority (decided after 2 agreeing answers, 1 cancelled)"}
        lines = [f"# Ensemble CPU per request ({time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, "
                 f"{os.cpu_count()} CPUs, {args.requests} requests x {args.rounds} rounds, {args.conns} concurrent)", "",
                 "| scenario | gateway CPU µs/req | x single | req/s | p50 ms | errors |", "|---|---:|---:|---:|---:|---:|"]
        for k, r in med.items():
            lines.append(f"| {labels[k]} | **{r['cpu_us']:.0f}** | {r['cpu_us'] / single:.1f} | {r['rps']:.0f} | "
                         f"{r['p50_ms']:.1f} | {r['errors']:.0f} |")
        out = "\n".join(lines) + "\n"
        print(out)
        if args.out:
            os.makedirs(os.path.dirname(args.out), exist_ok=True)
            with open(args.out, "w") as f:
                f.write(out)
    finally:
        for p in reversed(procs):
            hs.stop(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
