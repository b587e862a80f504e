#!/usr/bin/env python3
"""Interactive latency beside a low-priority flood (routing/queue.py; docs/routing.md, "Queues and priorities").

One gateway process (``helixagent serve``) in front of the fake OpenAI upstream (tests/fakes, answering after
``--upstream-ms``), the provider capped at ``--cap`` concurrent requests.  Three phases of ``--seconds`` each:

  alone       ``--interactive`` client loops at normal priority, nothing else
  low flood   the same, beside ``--flood`` loops sending ``x-helixagent-priority: low``
  same prio   the same, beside the flood at normal priority (what the cap does without priorities)

It prints p50 / p95 / p99 of the interactive requests in each phase and the flood's throughput.  The bound
to expect while the interactive load alone fits in the cap: an interactive request waits at most for the
first slot a low request gives back, i.e. p99 rises by at most about one upstream latency.  No assertion:
a measurement (results in bench/results/queue.md).

    .venv/bin/python bench/queue_bench.py [--cap 8] [--interactive 4] [--flood 64] [--seconds 10]
    .venv/bin/python bench/queue_bench.py --micro   # in process: CPU of a slot taken and given back
"""
from __future__ import annotations

import argparse
import asyncio
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, os.path.join(ROOT, "src"))

import aiohttp  # noqa: E402

from fakes.openai_upstream import Fault, FakeOpenAI  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pct(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


async def phase(url: str, seconds: float, interactive: int, flood: int, flood_priority: str | None) -> dict[str, float]:
    lat: list[float] = []
    flood_done = 0
    errors = 0
    stop = time.monotonic() + seconds
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello there"}]}
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=120)) as s:
        async def loop(kind: str) -> None:
            nonlocal flood_done, errors
            headers = {"x-helixagent-priority": flood_priority} if kind == "flood" and flood_priority else {}
            while time.monotonic() < stop:
                t0 = time.perf_counter()
                async with s.post(url + "/v1/chat/completions", json=body, headers=headers) as r:
                    await r.read()
                    ok = r.status == 200
                if not ok:
                    errors += 1
                elif kind == "flood":
                    flood_done += 1
                else:
                    lat.append(time.perf_counter() - t0)

        tasks = [asyncio.ensure_future(loop("interactive")) for _ in range(interactive)]
        if flood_priority is not None:
            tasks += [asyncio.ensure_future(loop("flood")) for _ in range(flood)]
        await asyncio.gather(*tasks)
    return {"n": len(lat), "p50": pct(lat, 50) * 1000, "p95": pct(lat, 95) * 1000, "p99": pct(lat, 99) * 1000,
            "mean": statistics.fmean(lat) * 1000 if lat else float("nan"), "flood_rps": flood_done / seconds,
            "errors": errors}


def micro() -> None:
    """CPU per request of the queue itself: a free slot (the common case) and a slot waited for."""
    from helixagent.pipeline import PRIORITIES, Identity, RequestContext
    from helixagent.routing.queue import ProviderQueue

    async def run() -> None:
        ctx = RequestContext("chat")
        ctx.identity = Identity(key_id="k")
        q = ProviderQueue("p", 8, {}, 5.0, 1000, "api_key")
        n = 200_000
        for _ in range(3):
            t = time.perf_counter()
            for _ in range(n):
                (await q.acquire(ctx, "m", 5.0)).release()
            print(f"free slot: acquire + release {(time.perf_counter() - t) / n * 1e6:.2f} us")
        # the same through a gateway's queue (http.max_conns_per_host) with the metrics attached, counting the
        # metrics' flushes (one per 1,000 requests; they turn the free slots into waits of 0 s)
        from helixagent.app import create_app
        from helixagent.config import load_config_dict
        gw = create_app(load_config_dict({"providers": [{"name": "p", "type": "openai", "api_key": "sk-bench-000000",
                                                         "models": ["m"]}],
                                          "http": {"max_conns_per_host": 256}}))
        m = gw.services["metrics"]
        gq = gw.router.queues.get("p")
        for _ in range(3):
            t = time.perf_counter()
            for i in range(n):
                (await gq.acquire(ctx, "m", 5.0)).release()
                if i % 1000 == 999:
                    m.flush()
            print(f"free slot, metrics attached: acquire + release {(time.perf_counter() - t) / n * 1e6:.2f} us")
        q = ProviderQueue("p", 1, {}, 60.0, 100_000, "api_key")
        held = await q.acquire(ctx, "m", 5.0)
        ctxs = []
        for i in range(5000):
            c = RequestContext("chat")
            c.identity = Identity(key_id=f"k{i % 50}")
            c.priority = PRIORITIES[i % 3]
            ctxs.append(c)

        async def one(c: RequestContext) -> None:
            (await q.acquire(c, "m", 60.0)).release()

        tasks = [asyncio.ensure_future(one(c)) for c in ctxs]
        await asyncio.sleep(0)
        t = time.perf_counter()
        held.release()
        await asyncio.gather(*tasks)
        print(f"5,000 waiters (3 priorities, 50 keys) served one at a time: "
              f"{(time.perf_counter() - t) / 5000 * 1e6:.2f} us each (incl. the task switch)")

    asyncio.run(run())


def main() -> int:
    if "--micro" in sys.argv:
        micro()
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cap", type=int, default=8)
    ap.add_argument("--interactive", type=int, default=4)
    ap.add_argument("--flood", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--upstream-ms", type=float, default=50.0)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "queue.md"))
    args = ap.parse_args()

    fake = FakeOpenAI()
    fake.sticky = Fault(delay=args.upstream_ms / 1000.0)
    port = free_port()
    tmp = tempfile.mkdtemp(prefix="helix-queue-bench-")
    cfg = os.path.join(tmp, "config.yaml")
    with open(cfg, "w") as f:
        f.write(f"""environment: development
server: {{port: {port}}}
database: {{url: "sqlite:///{tmp}/helix.db", spool_dir: "{tmp}/spool"}}
logging: {{level: warning}}
routing: {{queue: {{timeout_ms: 120000, max_waiting: 100000}}, request_timeout_ms: 300000}}
providers:
  - {{name: openai, type: openai, base_url: "{fake.base_url}", api_key: "{fake.api_key}",
     models: [gpt-4o-mini], max_concurrency: {args.cap}, timeout_ms: 120000}}
""")
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "src"))
    proc = subprocess.Popen([sys.executable, "-m", "helixagent", "serve", "--config", cfg, "--host", "127.0.0.1",
                             "--port", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    break
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    raise RuntimeError("the gateway did not start: " + (proc.stderr.read().decode()
                                                                       if proc.stderr else "")) from None
                time.sleep(0.1)
        asyncio.run(phase(url, 1.0, args.interactive, 0, None))  # warm-up
        rows = []
        for name, prio in (("alone", None), ("beside a low-priority flood", "low"),
                           ("beside a same-priority flood", "normal")):
            r = asyncio.run(phase(url, args.seconds, args.interactive, args.flood, prio))
            rows.append((name, r))
            print(f"{name:32} n={r['n']:5d}  p50 {r['p50']:7.1f}  p95 {r['p95']:7.1f}  p99 {r['p99']:7.1f} ms  "
                  f"flood {r['flood_rps']:6.1f} req/s  errors {r['errors']}", flush=True)
    finally:
        proc.terminate()
        proc.wait(10)
        fake.close()
    lines = [
        "# Interactive latency beside a low-priority flood (bench/queue_bench.py)", "",
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, Python {platform.python_version()}, "
        f"{os.cpu_count()} cores (shared).  Provider cap {args.cap}, upstream answers after {args.upstream_ms:.0f} ms, "
        f"{args.interactive} interactive client loops (normal priority), flood {args.flood} loops, "
        f"{args.seconds:.0f} s per phase; one gateway process.", "",
        "| interactive requests | n | p50 ms | p95 ms | p99 ms | flood req/s | errors |",
        "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in rows:
        lines.append(f"| {name} | {r['n']} | {r['p50']:.1f} | {r['p95']:.1f} | {r['p99']:.1f} | "
                     f"{r['flood_rps']:.1f} | {r['errors']} |")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("written", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
