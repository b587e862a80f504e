"""CPU microseconds per request of the observability stage (metrics + rolling window + access log),
in-process, side by side with the stage's parts switched off.

    python bench/observability_bench.py [--n 50000] [--multiprocess]

The access log writes real JSON lines to a file (the production path: the handler HelixAgent installs);
``--multiprocess`` measures prometheus_client's multiprocess (mmap) values, used with several workers.
Target: <= 15 us per request for metrics + logging together.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time

ap = argparse.ArgumentParser()
ap.add_argument("--n", type=int, default=50000)
ap.add_argument("--multiprocess", action="store_true")
args = ap.parse_args()
tmp = tempfile.mkdtemp(prefix="helix-obs-bench-")
if args.multiprocess:  # must be set before prometheus_client is imported
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tmp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from helixagent.app import create_app  # noqa: E402
from helixagent.canonical import ChatRequest, ChatResponse, Usage  # noqa: E402
from helixagent.config import load_config_dict  # noqa: E402
from helixagent.observability.logs import configure_logging, reset_logging  # noqa: E402
from helixagent.pipeline import Identity, RequestContext  # noqa: E402


def make_ctx(i: int) -> RequestContext:
    ctx = RequestContext("chat")
    ctx.method = "POST"
    ctx.path = "/v1/chat/completions"
    ctx.ip = "10.1.2.3"
    ctx.user_agent = "OpenAI/Python 1.50.0"
    ctx.identity = Identity(key_id="key_123", user_id="u1", application="app", role="user")
    ctx.request = ChatRequest("gpt-4o-mini", [{"role": "user", "content": "hello"}])
    ctx.provider = "openai"
    ctx.upstream_model = "gpt-4o-mini"
    u = Usage(12, 30, 42)
    ctx.response = ChatResponse({"id": "x"}, u, "openai", "gpt-4o-mini")
    ctx.usage = u
    ctx.cost = 0.00012
    ctx.upstream_latency = 0.25
    ctx.cache_status = "miss"
    ctx.finished_at = ctx.started + 0.3
    return ctx


def cpu_us(fn, ctxs) -> float:
    loop = asyncio.new_event_loop()

    async def run() -> float:
        t0 = time.process_time()
        for c in ctxs:
            await fn(c)
        return (time.process_time() - t0) / len(ctxs) * 1e6

    try:
        loop.run_until_complete(run())  # warm-up: label children resolved, caches filled
        return loop.run_until_complete(run())
    finally:
        loop.close()


def main() -> None:
    logfile = os.path.join(tmp, "access.log")
    cfg = load_config_dict({"providers": [{"name": "openai", "api_key": "sk-bench-000000",
                                           "models": ["gpt-4o-mini"]}],
                            "logging": {"level": "info", "format": "json", "file": logfile}})
    configure_logging(cfg.logging)
    gw = create_app(cfg)
    st = gw.services["observability"]
    n = args.n
    ctxs = [make_ctx(i) for i in range(n)]

    async def full(ctx):
        await st.pre(ctx)
        await st.post(ctx)

    async def noop(ctx):
        pass

    async def metrics_only(ctx):
        m = st.metrics
        ctx.state["obs"] = True
        m.inflight_add(1)
        m.inflight_add(-1)
        m.record(ctx, ctx.latency)  # what the stage's post-hook calls

    async def window_only(ctx):
        st.window.add(int(time.time()), ctx.latency, False, "miss", "openai", 12, 30, 0.00012)

    async def log_only(ctx):
        st.access.emit(ctx)

    counter = [0]

    async def full_with_flushes(ctx):
        # the periodic flushes (metrics every 0.5 s, log batches every 50 ms) cost something too: count
        # them as if each carried only 20 requests (at 40 req/s; more traffic makes them cheaper per request)
        await st.pre(ctx)
        await st.post(ctx)
        counter[0] += 1
        if counter[0] % 20 == 0:
            st.metrics.flush()
            st.access.flush()

    base = cpu_us(noop, ctxs)
    rows = [("loop overhead (subtracted)", base)]
    for name, fn in (("metrics", metrics_only), ("rolling window", window_only), ("access log (JSON to file)", log_only),
                     ("stage pre+post (all of it)", full),
                     ("  + periodic metric/log flushes, 1 per 20 requests", full_with_flushes)):
        rows.append((name, cpu_us(fn, ctxs) - base))
    logging_off = load_config_dict({"logging": {"level": "warning", "file": logfile}})
    configure_logging(logging_off.logging)
    rows.append(("stage pre+post, access log filtered by level", cpu_us(full, ctxs) - base))
    reset_logging()
    mode = "multiprocess (mmap)" if st.metrics.multiprocess else "single process"
    print(f"observability stage, CPU per request, {n} requests, prometheus_client {mode}, "
          f"Python {sys.version.split()[0]}")
    st.access.flush()
    for name, us in rows:
        print(f"  {name:48s} {us:7.2f} us")
    total = rows[5][1]
    print(f"  target <= 15 us for metrics + logging: {'OK' if total <= 15 else 'OVER'} ({total:.2f} us)")


if __name__ == "__main__":
    main()
