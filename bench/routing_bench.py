#!/usr/bin/env python3
"""Routing overhead on the happy path, in process (no network): CPU microseconds per request.

Measured side by side in one run:

* ``select+bookkeeping`` -- ``Router.plan`` (cached) + ``Router.order`` (strategy, breaker filter, cost
  limits) + ``acquire`` + ``success`` on the breaker, per strategy;
* ``handle_chat`` vs ``provider.chat`` -- the router's whole terminal handler around a zero-latency
  mock provider, minus calling that provider directly (both build the same RequestContext): what
  routing adds to a request (candidate selection, breaker, attempt bookkeeping, cost header).

Usage: /work/venv/bin/python bench/routing_bench.py [--n 200000]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from helixagent.canonical import ChatRequest  # noqa: E402
from helixagent.config import load_config_dict  # noqa: E402
from helixagent.pipeline import RequestContext  # noqa: E402
from helixagent.providers import build_provider  # noqa: E402
from helixagent.routing.router import Router  # noqa: E402

PRICES = {"gpt-4o-mini": {"input_per_mtok": 0.15, "output_per_mtok": 0.6}}


def router(strategy: str, limits: bool = False) -> Router:
    provs = [{"name": n, "type": "mock", "models": ["gpt-4o-mini"], "priority": i, "model_prices": PRICES,
              "fallback_to": ["c"] if n == "a" else []} for i, n in enumerate("abc")]
    routing: dict = {"strategy": strategy}
    if limits:
        routing.update(max_cost_per_token=1e-5, max_cost_per_request=1.0)
    cfg = load_config_dict({"providers": provs, "routing": routing})
    return Router(cfg, {p.name: build_provider(p, cfg.http) for p in cfg.providers})


REQ = ChatRequest("gpt-4o-mini", [{"role": "system", "content": "You are concise."},
                                  {"role": "user", "content": "Summarise TCP vs UDP in two sentences."}],
                  {"max_tokens": 128})


def cpu_us(fn, n: int) -> float:
    fn()
    out = []
    for _ in range(5):  # median of 5 rounds
        t0 = time.process_time()
        for _ in range(n // 5):
            fn()
        out.append((time.process_time() - t0) / (n // 5) * 1e6)
    return statistics.median(out)


def select_and_book(r: Router):
    plan, order, now = r.plan, r.order, r.clock

    def one() -> None:
        c = order(plan("gpt-4o-mini", None), REQ)[0]
        h = c.health
        p = h.acquire(now())
        h.success(0.05, False, p)
    return one


async def async_cpu_us(make_coro, n: int) -> float:
    await make_coro()
    t0 = time.process_time()
    for _ in range(n):
        await make_coro()
    return (time.process_time() - t0) / n * 1e6


async def handler_overhead(n: int) -> tuple[float, float]:
    r = router("priority")
    p = r.providers["a"]

    async def direct_call() -> None:  # the same context object, the provider called without routing
        ctx = RequestContext("chat")
        ctx.request = REQ
        ctx.response = await p.chat(REQ)
    async def via_router() -> None:
        ctx = RequestContext("chat")
        ctx.request = REQ
        await r.handle_chat(ctx)

    # interleaved rounds, median of each: the machine is shared, single runs are noisy
    ds, rs = [], []
    for _ in range(7):
        ds.append(await async_cpu_us(direct_call, n // 7))
        rs.append(await async_cpu_us(via_router, n // 7))
    return statistics.median(ds), statistics.median(rs)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200000)
    a = ap.parse_args()
    rows = []
    for strategy in ("priority", "latency", "cost", "weighted"):
        rows.append((f"select+bookkeeping {strategy}", cpu_us(select_and_book(router(strategy)), a.n)))
    rows.append(("select+bookkeeping priority + cost limits", cpu_us(select_and_book(router("priority", True)), a.n)))
    try:
        import uvloop  # the server's loop in production
        run = uvloop.run
    except ImportError:  # pragma: no cover
        run = asyncio.run
    direct, routed = run(handler_overhead(a.n // 4))
    rows.append(("provider.chat (mock) direct", direct))
    rows.append(("Router.handle_chat -> mock", routed))
    rows.append(("=> routing overhead per request", routed - direct))
    print(f"python {sys.version.split()[0]}, n={a.n}")
    for name, us in rows:
        print(f"  {name:<45} {us:8.2f} us CPU")


if __name__ == "__main__":
    main()
