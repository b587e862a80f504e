#!/usr/bin/env python3
"""Abuse benchmark: promises under load and attack (bounded in count and time, loopback only).

Sections (``--section NAME``, or ``all``):

* ``admission``: a virtual key with ``requests_per_minute: 100`` gets 1,000 concurrent requests, first
  to one gateway process, then spread over three processes on the same Redis; prints admitted vs
  allowed (and the 429/503 counts).  Needs Redis (``HELIX_BENCH_REDIS_URL``, default
  redis://127.0.0.1:6379/0).

Usage: .venv/bin/python bench/abuse_bench.py --section admission
"""
from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
import uuid
from typing import Any, Callable

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
SRC = os.path.join(ROOT, "src")
sys.path.insert(0, SRC)


# -- admission ---------------------------------------------------------------------------------------------
def section_admission(total: int = 1000, limit: int = 100) -> None:
    import aiohttp
    import httpx
    import redis
    import yaml

    url = os.environ.get("HELIX_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
    master = "bench-master-key-0123456789"
    model = "mock-1"

    def free_port() -> int:
        import socket
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    def start(n: int, tmp: str, prefix: str) -> list[tuple[subprocess.Popen, int, Any]]:
        cfg = {"auth": {"master_key": master, "redis_prefix": prefix},
               "database": {"url": f"sqlite:///{tmp}/keys.db"},
               "logging": {"level": "warning"},
               "providers": [{"name": "mock", "type": "mock", "mock_tokens": 8, "models": [model],
                              "latency_ms": 50}],
               "rate_limits": {"backend": "redis", "redis_url": url, "key_prefix": prefix, "redis_timeout": 3.0,
                               "api_key": {"requests_per_minute": limit}}}
        path = os.path.join(tmp, f"{prefix}.yaml")
        with open(path, "w") as f:
            yaml.safe_dump(cfg, f)
        env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY") and k != "HELIXAGENT_CONFIG"}
        env["PYTHONPATH"] = SRC
        procs = []
        for i in range(n):
            port = free_port()
            log = open(os.path.join(tmp, f"{prefix}-{i}.log"), "w")
            p = subprocess.Popen([sys.executable, "-m", "helixagent", "serve", "--config", path, "--port", str(port)],
                                 env=env, stdout=log, stderr=subprocess.STDOUT)
            procs.append((p, port, log))
        deadline = time.time() + 60
        for p, port, _ in procs:
            while True:
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if p.poll() is not None or time.time() > deadline:
                    raise SystemExit("a gateway process did not start")
                time.sleep(0.1)
        return procs

    async def fire(urls: list[str], key: str) -> list[int]:
        conn = aiohttp.TCPConnector(limit=0, force_close=True)
        async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=120)) as s:
            gate = asyncio.Event()

            async def one(i: int) -> int:
                await gate.wait()
                async with s.post(urls[i % len(urls)] + "/v1/chat/completions",
                                  headers={"authorization": f"Bearer {key}"},
                                  json={"model": model, "max_tokens": 8,
                                        "messages": [{"role": "user", "content": "hello"}]}) as r:
                    await r.read()
                    return r.status

            tasks = [asyncio.ensure_future(one(i)) for i in range(total)]
            await asyncio.sleep(0)
            gate.set()
            return list(await asyncio.gather(*tasks))

    print(f"admission: a key with requests_per_minute {limit}, {total} concurrent requests, Redis {url}")
    for n in (1, 3):
        prefix = "hxbench-" + uuid.uuid4().hex[:10]
        with tempfile.TemporaryDirectory() as tmp:
            procs = start(n, tmp, prefix)
            try:
                base = f"http://127.0.0.1:{procs[0][1]}"
                r = httpx.post(base + "/admin/keys", json={"role": "user", "user_id": "bench"},
                               headers={"authorization": f"Bearer {master}"}, timeout=10)
                key = r.json()["key"]
                t0 = time.perf_counter()
                codes = asyncio.run(fire([f"http://127.0.0.1:{port}" for _, port, _ in procs], key))
                dt = time.perf_counter() - t0
                other = {c: codes.count(c) for c in set(codes) if c not in (200, 429)}
                print(f"  {n} instance{'s' if n > 1 else ' '}: admitted {codes.count(200):4d} of {total} "
                      f"(allowed {limit}); 429: {codes.count(429)}; other: {other or 'none'}; {dt:.2f}s")
            finally:
                for p, _, _log in procs:
                    p.terminate()
                for p, _, log in procs:
                    try:
                        p.wait(20)
                    except subprocess.TimeoutExpired:
                        p.kill()
                    log.close()
                rc = redis.Redis.from_url(url)
                keys = list(rc.scan_iter(match=f"{prefix}:*", count=1000))
                if keys:
                    rc.delete(*keys)
                rc.close()


SECTIONS: dict[str, Callable[[], None]] = {
    "admission": section_admission,
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--section", default="all", choices=["all", *SECTIONS])
    args = ap.parse_args()
    for name, fn in SECTIONS.items():
        if args.section in ("all", name):
            fn()


if __name__ == "__main__":
    main()
