"""Pipeline semantics: pre-hooks in order, post-hooks in reverse, short-circuits, streams."""
import asyncio
import time

import httpx
import pytest

from helixagent.canonical import ChatRequest, ChatResponse, Usage, new_chunk
from helixagent.errors import GatewayError
from helixagent.pipeline import Pipeline, RequestContext, Stage, new_request_id
from fakes.openai_upstream import Fault
from support.servers import wait_until


class Rec(Stage):
    def __init__(self, name, log, short=False, reject=False):
        self.name, self.log, self.short, self.reject = name, log, short, reject

    async def pre(self, ctx):
        self.log.append(f"pre:{self.name}")
        if self.reject:
            raise GatewayError(429, "no")
        if self.short:
            ctx.response = ChatResponse({"choices": []}, Usage(), "cache")
            return True
        return False

    async def post(self, ctx):
        self.log.append(f"post:{self.name}:{ctx.status}")


def run(stages, handler):
    async def go():
        p = Pipeline(stages, handler)
        ctx = RequestContext("chat")
        ctx.request = ChatRequest("m", [{"role": "user", "content": "x"}])
        entered = await p.run(ctx)
        if ctx.stream is not None and ctx.error is None:
            out = [c async for c in p.iterate(ctx, entered)]
            return ctx, out
        await p.finish(ctx, entered)
        return ctx, None
    return asyncio.run(go())


def test_order_and_reverse_posts():
    log = []

    async def handler(ctx):
        log.append("handler")
        ctx.response = ChatResponse({"choices": []}, Usage(1, 2, 3), "p")

    run([Rec("a", log), Rec("b", log), Rec("c", log)], handler)
    assert log == ["pre:a", "pre:b", "pre:c", "handler", "post:c:200", "post:b:200", "post:a:200"]


def test_short_circuit_runs_posts_of_entered_stages_only():
    log = []

    async def handler(ctx):
        log.append("handler")

    run([Rec("a", log), Rec("cache", log, short=True), Rec("c", log)], handler)
    assert log == ["pre:a", "pre:cache", "post:cache:200", "post:a:200"]


def test_rejection_sets_error_and_status():
    log = []

    async def handler(ctx):
        log.append("handler")

    ctx, _ = run([Rec("a", log), Rec("limits", log, reject=True), Rec("c", log)], handler)
    assert ctx.error.status == 429 and ctx.status == 429
    assert log == ["pre:a", "pre:limits", "post:limits:429", "post:a:429"]


def test_stream_posts_run_at_end_with_accumulated_answer():
    log = []

    async def gen():
        yield new_chunk("id", "m", 1, {"role": "assistant", "content": ""})
        yield new_chunk("id", "m", 1, {"content": "hel"})
        yield new_chunk("id", "m", 1, {"content": "lo"}, "stop")

    async def handler(ctx):
        ctx.stream = gen()

    class Check(Stage):
        async def post(self, ctx):
            log.append(ctx.response.body["choices"][0]["message"]["content"])
            log.append(ctx.first_token_at is not None)

    ctx, out = run([Check()], handler)
    assert len(out) == 3 and log == ["hello", True]


def test_stream_error_midway_is_captured():
    async def gen():
        yield new_chunk("id", "m", 1, {"content": "a"})
        raise GatewayError(502, "broke", provider="p")

    async def handler(ctx):
        ctx.stream = gen()

    ctx, out = run([], handler)
    assert len(out) == 1 and ctx.error.status == 502 and ctx.status == 502


def test_bug_in_a_stage_becomes_500_not_a_crash():
    class Boom(Stage):
        async def pre(self, ctx):
            raise KeyError("x")

    async def handler(ctx):
        pass

    ctx, _ = run([Boom()], handler)
    assert ctx.error.status == 500 and "KeyError" in ctx.error.message


def test_request_ids_unique():
    ids = {new_request_id() for _ in range(10000)}
    assert len(ids) == 10000


def test_client_disconnect_mid_stream_closes_upstream_and_runs_posts(gateway, fake_openai):
    seen = []

    class Probe(Stage):
        async def post(self, ctx):
            seen.append((ctx.client_disconnected, ctx.response is not None, ctx.status))

    gateway.app.chat_pipeline.stages.append(Probe())
    fake_openai.push(Fault(chunk_delay=2.0))  # 7 chunks: the stream would take 14 s
    with httpx.stream("POST", gateway.url + "/v1/chat/completions", timeout=10,
                      json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "a b c d e"}],
                            "stream": True}) as r:
        it = r.iter_lines()
        next(it)
    # the gateway stops waiting on the upstream as soon as the client is gone (well before the next chunk)
    deadline = time.time() + 1.5
    while not seen and time.time() < deadline:
        time.sleep(0.05)
    assert seen and seen[0] == (True, True, 499)


def _probe(gateway):
    seen = []

    class Probe(Stage):
        async def post(self, ctx):
            seen.append((ctx.client_disconnected, ctx.response is not None, ctx.status))

    gateway.app.chat_pipeline.stages.append(Probe())
    return seen


def _hang_up_while_waiting(gateway, path, body):
    # the client gives up (its read timeout closes the connection) while the upstream takes 3 s
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(gateway.url + path, json=body, timeout=httpx.Timeout(5, read=0.3),
                   headers={"x-api-key": "unused"})


@pytest.mark.parametrize("path,body", [
    ("/v1/chat/completions", {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}),
    ("/v1/chat/completions", {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}],
                              "stream": True}),  # a stream whose first chunk has not come yet
    ("/v1/messages", {"model": "gpt-4o-mini", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}),
])
def test_client_disconnect_while_waiting_is_noticed_and_recorded_as_499(gateway, fake_openai, path, body):
    seen = _probe(gateway)
    fake_openai.push(Fault(delay=3))
    _hang_up_while_waiting(gateway, path, body)
    # noticed while the upstream is still busy (it answers after 3 s): the record says 499, no answer
    assert wait_until(lambda: seen, 1.5)
    assert seen[0] == (True, False, 499)
    assert len(fake_openai.calls) == 1


def test_client_disconnect_while_waiting_hangs_up_upstream(gateway, fake_openai):
    fake_openai.push(Fault(delay=3))
    _hang_up_while_waiting(gateway, "/v1/chat/completions",
                           {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]})
    assert wait_until(lambda: fake_openai.calls and fake_openai.calls[0]["disconnected"], 1.5)
