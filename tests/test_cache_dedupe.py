"""De-duplication edge cases driven through the pipeline directly (no HTTP): a leader cancelled before it
answers, a stream abandoned by every reader, a later stage that never lets the upstream call run."""
from __future__ import annotations

import asyncio
from typing import Any

import orjson

from helixagent.api.openai_format import parse_chat
from helixagent.app import create_app
from helixagent.canonical import ChatResponse, Usage, new_chunk
from helixagent.cache import CacheService, CacheStage
from helixagent.config import load_config_dict
from helixagent.pipeline import Pipeline, RequestContext, Stage


def make(inner: Any, extra_stage: Stage | None = None) -> tuple[Pipeline, CacheService]:
    gw = create_app(load_config_dict({"providers": [{"name": "openai", "type": "openai", "api_key": "sk-x",
                                                     "base_url": "http://127.0.0.1:1/v1",
                                                     "models": ["gpt-4o-mini"]}]}))
    svc = CacheService(gw.cfg.cache.model_copy(update={"enabled": True}), gw.router)
    stages: list[Stage] = [CacheStage(svc)] + ([extra_stage] if extra_stage else [])
    return Pipeline(stages, svc.wrap(inner)), svc


def ctx_for(stream: bool = False) -> RequestContext:
    ctx = RequestContext("chat")
    body = {"model": "gpt-4o-mini", "temperature": 0, "messages": [{"role": "user", "content": "hi"}],
            "stream": stream}
    ctx.request, ctx.state["helix"] = parse_chat(orjson.dumps(body), {"openai"})
    return ctx


def answer(n: int) -> ChatResponse:
    body = {"id": f"chatcmpl-{n}", "object": "chat.completion", "created": 1, "model": "gpt-4o-mini",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": f"answer {n}"},
                         "logprobs": None, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}}
    return ChatResponse(body, Usage(1, 2, 3), "openai", "gpt-4o-mini")


async def test_followers_of_a_cancelled_leader_start_over_with_one_new_leader() -> None:
    calls = 0

    async def inner(ctx: RequestContext) -> None:
        nonlocal calls
        calls += 1
        n = calls
        await asyncio.sleep(10 if n == 1 else 0.05)
        ctx.provider, ctx.upstream_model, ctx.response = "openai", "gpt-4o-mini", answer(n)

    pipe, svc = make(inner)
    ctxs = [ctx_for() for _ in range(4)]
    leader = asyncio.ensure_future(pipe.run(ctxs[0]))
    await asyncio.sleep(0.01)
    followers = [asyncio.ensure_future(pipe.run(c)) for c in ctxs[1:]]
    await asyncio.sleep(0.01)
    leader.cancel()
    await asyncio.gather(*followers)
    assert calls == 2  # the cancelled leader and exactly one new leader
    assert sorted(c.cache_status for c in ctxs[1:]) == ["HIT", "HIT", "MISS"]
    assert {c.response.body["choices"][0]["message"]["content"] for c in ctxs[1:]} == {"answer 2"}
    assert all(c.error is None for c in ctxs[1:])
    assert svc.inflight == {}


async def test_stream_abandoned_by_every_reader_closes_the_upstream_and_stores_nothing() -> None:
    closed = asyncio.Event()

    async def upstream() -> Any:
        try:
            for i in range(100):
                yield new_chunk("c1", "gpt-4o-mini", 1, {"content": f"t{i} "})
                await asyncio.sleep(0.01)
        finally:
            closed.set()

    async def inner(ctx: RequestContext) -> None:
        ctx.provider, ctx.upstream_model, ctx.stream = "openai", "gpt-4o-mini", upstream()

    pipe, svc = make(inner)
    ctx = ctx_for(stream=True)
    entered = await pipe.run(ctx)
    it = pipe.iterate(ctx, entered)
    await it.__anext__()
    await it.__anext__()
    await it.aclose()  # the only reader goes away
    await asyncio.wait_for(closed.wait(), 2)
    await asyncio.sleep(0.01)
    assert svc.inflight == {} and not svc.pumps and svc.stats.stores == 0
    assert svc.backend.data == {}


async def test_a_later_stage_that_answers_releases_the_followers() -> None:
    class Answering(Stage):
        name = "answering"

        async def pre(self, ctx: RequestContext) -> bool:
            await asyncio.sleep(0.05)
            ctx.response = answer(0)
            return True

    async def inner(ctx: RequestContext) -> None:  # pragma: no cover - never reached
        raise AssertionError("upstream called")

    pipe, svc = make(inner, Answering())
    ctxs = [ctx_for() for _ in range(3)]

    async def serve(c: RequestContext) -> None:  # what a route does: run, then finish
        await pipe.finish(c, await pipe.run(c))

    await asyncio.wait_for(asyncio.gather(*(serve(c) for c in ctxs)), 5)
    assert all(c.response is not None and c.error is None for c in ctxs)
    assert svc.inflight == {}
