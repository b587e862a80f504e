#!/usr/bin/env python3
"""CPU cost of authentication + rate limits/budgets on the hot path (memory backend, in process).

For an allowed request with a virtual key (cached, as in steady state) and seven limits active --
per-IP GCRA, per-key requests and tokens per minute, per-user tokens per minute and per day, per-app
tokens per month, per-key cost per day -- it runs AuthStage.pre + LimitsStage.pre + LimitsStage.post
and reports CPU microseconds per request (time.process_time), side by side with:

  * baseline     : building the RequestContext only (subtracted from the others)
  * master key   : auth with the master key, no limits apply
  * virtual key  : auth with a cached virtual key, no limits configured
  * key + limits : the full case above (the number the 30 us target refers to)

Usage: /work/venv/bin/python bench/auth_limits_bench.py [--n 50000] [--rounds 5]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from helixagent.auth import Authenticator, AuthStage  # noqa: E402
from helixagent.auth.keys import KeyStore  # noqa: E402
from helixagent.canonical import ChatRequest, Usage  # noqa: E402
from helixagent.config import load_config_dict  # noqa: E402
from helixagent.limits import Limiter, LimitsStage  # noqa: E402
from helixagent.limits.backends import MemoryBackend  # noqa: E402
from helixagent.pipeline import RequestContext  # noqa: E402
from helixagent.store.db import make_engine  # noqa: E402

BIG = 10 ** 12
MESSAGES = [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Summarise the plot of Hamlet in three sentences, please."}]


async def measure(n: int, token: str, auth: Authenticator, limits_stage: LimitsStage | None) -> float:
    auth_stage = AuthStage(auth)
    usage = Usage(30, 120, 150)
    req = ChatRequest(model="mock-1", messages=MESSAGES, params={"max_tokens": 256})
    headers = {"authorization": "Bearer " + token, "content-type": "application/json"}
    t0 = time.process_time()
    for _ in range(n):
        ctx = RequestContext("chat", "openai", "r")
        ctx.ip = "10.0.0.1"
        ctx.headers = headers
        ctx.request = req
        if auth_stage is not None and token:
            await auth_stage.pre(ctx)
        if limits_stage is not None:
            await limits_stage.pre(ctx)
            ctx.usage = usage
            await limits_stage.post(ctx)
    return (time.process_time() - t0) / n * 1e6


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=50000)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    tmp = tempfile.mkdtemp()
    engine = make_engine(f"sqlite:///{tmp}/bench.db")
    store = KeyStore(engine)
    await store.ensure_table()
    master = "bench-master-key-000000000000"
    _, secret = await store.create(user_id="bench-user", application="bench-app", role="user",
                                   limits={"cost_per_day": 10.0 ** 6})
    auth = Authenticator(master, store, ttl=3600)
    await auth.identify(secret)  # warm the key cache (steady state)
    cfg_all = load_config_dict({
        "providers": [{"name": "mock", "type": "mock", "models": ["mock-1"],
                       "model_prices": {"mock-1": {"input_per_mtok": 1, "output_per_mtok": 2}}}],
        "rate_limits": {"ip": {"requests_per_minute": BIG, "burst_size": BIG},
                        "api_key": {"requests_per_minute": BIG, "tokens_per_minute": BIG},
                        "user": {"tokens_per_minute": BIG, "tokens_per_day": BIG},
                        "application": {"tokens_per_month": BIG}}})

    class GW:  # what the limiter needs from the gateway for prices
        def __init__(self, cfg):
            from helixagent.app import Gateway
            self.g = Gateway(cfg)
            self.providers = self.g.providers
            self.router = self.g.router
    lim = Limiter(cfg_all, MemoryBackend(), GW(cfg_all))
    full = LimitsStage(lim)

    cases = [("baseline (context only)", "", None), ("master key, no limits", master, None),
             ("virtual key, no limits", secret, None), ("virtual key + 7 limits (memory)", secret, full)]
    for _, tok, st in cases:  # warm-up
        await measure(2000, tok, auth, st)
    results: dict[str, list[float]] = {c[0]: [] for c in cases}
    for _ in range(args.rounds):
        for name, tok, st in cases:
            results[name].append(await measure(args.n, tok, auth, st))
    base = statistics.median(results[cases[0][0]])
    print(f"CPU per request, median of {args.rounds} rounds x {args.n} requests (python {sys.version.split()[0]})")
    print(f"{'case':36} {'total us':>9} {'minus baseline':>15}")
    for name, _, _ in cases:
        m = statistics.median(results[name])
        print(f"{name:36} {m:9.2f} {m - base:15.2f}")
    added = statistics.median(results[cases[-1][0]]) - base
    print(f"\nauth + limits added per allowed request: {added:.2f} us (target <= 30 us): "
          f"{'OK' if added <= 30 else 'OVER'}")
    assert lim.rejected == 0
    await engine.dispose()


if __name__ == "__main__":
    asyncio.run(main())
