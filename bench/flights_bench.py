"""What cross-instance de-duplication costs a cache miss: the cache stage and its wrapped handler driven
directly (no HTTP, an instant upstream), distinct cacheable requests (every one a miss, then stored),
``cache.dedupe_across_instances`` on and off, against a private redis-server.  Reports wall time per miss
at a given concurrency and the Redis commands per miss (INFO commandstats).

    .venv/bin/python bench/flights_bench.py [requests] [concurrency]
"""
from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from helixagent.api.openai_format import parse_chat  # noqa: E402
from helixagent.app import create_app  # noqa: E402
from helixagent.cache import CacheService, CacheStage  # noqa: E402
from helixagent.canonical import ChatResponse, Usage  # noqa: E402
from helixagent.config import load_config_dict  # noqa: E402
from helixagent.pipeline import Pipeline, RequestContext  # noqa: E402
from support.redis_server import PrivateRedis  # noqa: E402


def answer(n: int) -> ChatResponse:
    body = {"id": f"chatcmpl-{n}", "object": "chat.completion", "created": 1, "model": "gpt-4o-mini",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": f"answer {n}"},
                         "logprobs": None, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}}
    return ChatResponse(body, Usage(1, 2, 3), "openai", "gpt-4o-mini")


async def run(url: str, across: bool, n: int, conc: int) -> tuple[float, float]:
    gw = create_app(load_config_dict({"providers": [{"name": "openai", "type": "openai", "api_key": "sk-x",
                                                     "base_url": "http://127.0.0.1:1/v1", "models": ["gpt-4o-mini"]}]}))
    cfg = gw.cfg.cache.model_copy(update={"enabled": True, "type": "redis", "redis_url": url,
                                          "key_prefix": f"bench{time.monotonic_ns()}:", "dedupe_across_instances": across})
    svc = CacheService(cfg, gw.router)
    await svc.start()

    async def inner(ctx: RequestContext) -> None:
        ctx.provider, ctx.upstream_model, ctx.response = "openai", "gpt-4o-mini", answer(0)

    pipe = Pipeline([CacheStage(svc)], svc.wrap(inner))
    import redis.asyncio as r
    info = r.Redis.from_url(url)
    await info.config_resetstat()

    async def one(i: int) -> None:
        ctx = RequestContext("chat")
        body = {"model": "gpt-4o-mini", "temperature": 0, "messages": [{"role": "user", "content": f"q{i}"}]}
        ctx.request, ctx.state["helix"] = parse_chat(orjson.dumps(body), {"openai"})
        entered = await pipe.run(ctx)
        await pipe.finish(ctx, entered)
        assert ctx.cache_status == "MISS", (ctx.cache_status, ctx.error)

    sem = asyncio.Semaphore(conc)

    async def bounded(i: int) -> None:
        async with sem:
            await one(i)
    t0 = time.perf_counter()
    await asyncio.gather(*(bounded(i) for i in range(n)))
    wall = (time.perf_counter() - t0) / n
    await asyncio.sleep(0.2)  # the leases' publish-and-release tasks
    stats: dict[str, Any] = await info.info("commandstats")
    cmds = sum(int(v["calls"]) for k, v in stats.items() if not k.endswith(("config", "info")))
    await info.aclose()
    await svc.close()
    return wall * 1e6, cmds / n


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 3000
    conc = int(sys.argv[2]) if len(sys.argv) > 2 else 50
    srv = PrivateRedis()
    try:
        for across in (False, True, False, True):
            us, per = asyncio.run(run(srv.url, across, n, conc))
            print(f"dedupe_across_instances={str(across):5}: {us:7.0f} us wall per miss "
                  f"(concurrency {conc}), {per:.1f} Redis commands per miss")
    finally:
        srv.close()


if __name__ == "__main__":
    main()
