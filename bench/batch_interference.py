#!/usr/bin/env python
"""Interactive latency beside a local batch: how much a batch running in the same gateway process raises
the p50/p99 of interactive chat requests.

    httpx (C concurrent clients) -> HelixAgent (`helixagent serve`, 1 worker, mock provider with latency)
    phase "alone": interactive requests only; phase "with batch": the same while a local batch of
    --lines lines runs (batches.local_concurrency = --batch-concurrency)

Rounds alternate the two phases (shared, noisy machines: compare within one run).  The figure that
matters is the added p99 in milliseconds and as a ratio.

Usage: python bench/batch_interference.py [--requests 300] [--conns 4] [--lines 3000] [--rounds 3]
       [--batch-concurrency 4] [--latency-ms 20] [--out bench/results/batches.md]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import httpx
import orjson
import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(os.path.dirname(HERE), "src")
MASTER = "bench-master-key-0123456789"
H = {"authorization": f"Bearer {MASTER}"}


def free_port() -> int:
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = int(s.getsockname()[1])
    s.close()
    return port


def serve(tmp: str, latency_ms: int, conc: int) -> tuple[subprocess.Popen[bytes], str]:
    cfg = os.path.join(tmp, "gw.yaml")
    with open(cfg, "w") as f:
        yaml.safe_dump({"auth": {"master_key": MASTER}, "logging": {"level": "warning"},
                        "providers": [{"name": "mock", "type": "mock", "models": ["mock-1"],
                                       "latency_ms": latency_ms, "mock_tokens": 8}],
                        "database": {"url": f"sqlite:///{tmp}/gw.db", "spool_dir": f"{tmp}/spool"},
                        "batches": {"local_concurrency": conc, "poll_interval": "100ms"}}, f)
    port = free_port()
    env = dict(os.environ, PYTHONPATH=SRC)
    env.pop("HELIXAGENT_API_KEY", None)
    proc = subprocess.Popen([sys.executable, "-m", "helixagent", "serve", "-c", cfg, "--port", str(port)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise SystemExit("the gateway did not start")


async def interactive(url: str, n: int, conns: int) -> list[float]:
    lat: list[float] = []
    body = {"model": "mock-1", "messages": [{"role": "user", "content": "interactive question"}]}
    async with httpx.AsyncClient(base_url=url, headers=H, timeout=30) as c:
        left = n

        async def worker() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                t = time.perf_counter()
                r = await c.post("/v1/chat/completions", json=body)
                lat.append((time.perf_counter() - t) * 1000)
                assert r.status_code == 200, r.text
        await asyncio.gather(*(worker() for _ in range(conns)))
    return lat


def start_batch(url: str, lines: int) -> str:
    content = b"".join(orjson.dumps({"custom_id": f"b{i}", "method": "POST", "url": "/v1/chat/completions",
                                     "body": {"model": "mock-1", "messages": [{"role": "user", "content": f"n {i}"}]}})
                       + b"\n" for i in range(lines))
    f = httpx.post(url + "/v1/files", headers=H, files={"file": ("b.jsonl", content)}, data={"purpose": "batch"},
                   timeout=60).json()
    b = httpx.post(url + "/v1/batches", headers=H, timeout=60, json={
        "input_file_id": f["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"}).json()
    return str(b["id"])


def pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--conns", type=int, default=4)
    ap.add_argument("--lines", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch-concurrency", type=int, default=4)
    ap.add_argument("--latency-ms", type=int, default=20)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    res: dict[str, list[tuple[float, float]]] = {"alone": [], "with batch": []}
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = serve(tmp, a.latency_ms, a.batch_concurrency)
        try:
            asyncio.run(interactive(url, 50, a.conns))  # warm-up
            for _ in range(a.rounds):
                lat = asyncio.run(interactive(url, a.requests, a.conns))
                res["alone"].append((pct(lat, 50), pct(lat, 99)))
                bid = start_batch(url, a.lines)
                time.sleep(0.5)  # the runner is busy
                lat = asyncio.run(interactive(url, a.requests, a.conns))
                st = httpx.get(f"{url}/v1/batches/{bid}", headers=H).json()
                assert st["status"] == "in_progress", "the batch ended before the phase did: raise --lines"
                res["with batch"].append((pct(lat, 50), pct(lat, 99)))
                httpx.post(f"{url}/v1/batches/{bid}/cancel", headers=H)
                for _ in range(300):
                    if httpx.get(f"{url}/v1/batches/{bid}", headers=H).json()["status"] == "cancelled":
                        break
                    time.sleep(0.1)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
    lines = [f"# bench/batch_interference.py ({platform.node()}, {os.cpu_count()} cores, shared)", "",
             f"interactive: {a.requests} chat requests x {a.rounds} rounds, {a.conns} concurrent; mock upstream "
             f"{a.latency_ms} ms; batch: {a.lines} lines, local_concurrency {a.batch_concurrency}", "",
             "| phase | p50 ms (median of rounds) | p99 ms (median of rounds) |", "|---|---:|---:|"]
    med = {k: (statistics.median(x[0] for x in v), statistics.median(x[1] for x in v)) for k, v in res.items()}
    for k, (p50, p99) in med.items():
        lines.append(f"| {k} | {p50:.1f} | {p99:.1f} |")
    d = med["with batch"][1] - med["alone"][1]
    lines += ["", f"p99 added by the batch: {d:+.1f} ms ({med['with batch'][1] / med['alone'][1]:.2f}x)",
              "", "rounds (p50, p99): " + "; ".join(f"{k}: " + ", ".join(f"({x:.1f}, {y:.1f})" for x, y in v)
                                                   for k, v in res.items())]
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
