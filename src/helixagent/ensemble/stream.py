"""The combined answer as a stream of canonical chunks.

The role chunk goes out at once; while the panel works the stream carries keep-alive markers (rendered as SSE
comments by /v1/ensemble/completions; other endpoints get none), then: a vote's winner as soon as the vote is
decided, or the judge's synthesis relayed token by token as the judge writes it; then one chunk with
``choices: []`` and the ``ensemble`` object; then the usage chunk when the client asked for it."""
from __future__ import annotations

import asyncio
import time
from contextlib import aclosing
from typing import TYPE_CHECKING, Any, AsyncGenerator, AsyncIterator

from ..canonical import StreamAccumulator, new_chunk, replay_chunks, usage_chunk
from ..errors import GatewayError
from ..pipeline import RequestContext
from .answers import ANSWERED, Answer
from .engine import Engine, combined_body, describe, response_of
from .strategies import Decision, agreement

if TYPE_CHECKING:
    from .service import EnsembleService

KEEPALIVE: dict[str, Any] = {"object": "helixagent.keepalive", "choices": []}
KEEPALIVE_SECONDS = 5.0


async def _cancel(task: "asyncio.Future[Any]") -> None:
    if not task.done():
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def _keepalive(task: "asyncio.Future[Any]", every: float | None) -> AsyncGenerator[dict[str, Any], None]:
    """KEEPALIVE every ``every`` seconds (None: none) until ``task`` is done; ``task`` is cancelled if the
    stream ends first (the client left, or the shutdown drain ended, while the panel worked)."""
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=every)
            if not task.done():
                yield KEEPALIVE
    finally:
        await _cancel(task)


async def combined_stream(svc: "EnsembleService", ctx: RequestContext, eng: Engine) -> AsyncIterator[dict[str, Any]]:
    spec = eng.spec
    rid = ctx.request_id
    id_ = f"chatcmpl-{rid}"
    model = spec.label
    created = int(time.time())
    keep = bool(ctx.state.get("ensemble_keepalive"))
    err: GatewayError | None = None
    try:
        yield new_chunk(id_, model, created, {"role": "assistant", "content": ""})
        wait = KEEPALIVE_SECONDS if keep else None
        task = asyncio.ensure_future(eng.panel())
        async with aclosing(_keepalive(task, wait)) as ka:  # closed (the panel cancelled) before done() runs
            async for ch in ka:
                yield ch
        answers = task.result()
        if spec.uses_judge and spec.judge_mode == "synthesis":
            # closed here, not by the garbage collector: the judge's call settles before done() runs
            async with aclosing(_judge_stream(svc, ctx, eng, answers, id_, model, created)) as js:
                async for ch in js:
                    yield ch
        else:
            task2 = asyncio.ensure_future(eng.decide(answers))
            async with aclosing(_keepalive(task2, wait)) as ka:
                async for ch in ka:
                    yield ch
            eng.decision = task2.result()
            for ch in _winner_chunks(eng, eng.decision, id_, model, created):
                yield ch
        d = eng.decision
        assert d is not None
        yield {"id": id_, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [],
               "ensemble": describe(eng, rid, d, ctx.state.get("ensemble_reserved"))}
        if ctx.request.include_usage:
            yield usage_chunk(id_, model, created, eng.calls.usage)
    except GatewayError as exc:
        err = exc
        raise
    finally:
        svc.done(ctx, eng, eng.decision, err)


def _winner_chunks(eng: Engine, d: Decision, id_: str, model: str, created: int) -> list[dict[str, Any]]:
    body = combined_body(eng, d, id_, created, "logprobs" in eng.req.params)
    out = []
    for ch in replay_chunks(response_of(body, eng, d))[1:]:  # the role chunk went out first
        ch["id"], ch["model"], ch["created"] = id_, model, created
        out.append(ch)
    return out


async def _judge_stream(svc: "EnsembleService", ctx: RequestContext, eng: Engine, answers: list[Answer], id_: str,
                        model: str, created: int) -> AsyncGenerator[dict[str, Any], None]:
    """Relay the judge's synthesis as it is written; a judge that fails before its first token is replaced by
    the majority vote (decision ``judge_failed_vote``), after it the stream ends with the error."""
    calls = eng.calls
    jreq, jm = eng.judge_call(answers)
    child = calls.child(jreq, jm, True)
    ans = Answer(jm, "failed")
    eng.judge = ans
    acc = StreamAccumulator()
    sent = 0
    t0 = time.perf_counter()
    failed: GatewayError | None = None
    try:
        await svc.router.handle_pinned(child)
        stream = child.stream
        assert stream is not None, "a streamed pinned call sets ctx.stream"
        try:
            async for ch in stream:
                acc.add(ch)
                for c in ch.get("choices") or ():
                    delta = c.get("delta") or {}
                    text = delta.get("content")
                    fr = c.get("finish_reason")
                    if text or fr:
                        if eng.decided_at is None:
                            eng.decided_at = time.perf_counter()
                        sent += 1
                        yield new_chunk(id_, model, created, {"content": text} if text else {}, fr)
        finally:
            closer = getattr(stream, "aclose", None)
            if closer is not None:
                await closer()
        child.response = acc.response(jm.provider)
        child.usage = acc.usage
        ans.status = ANSWERED
        ans.response = child.response
    except GatewayError as exc:
        child.error = exc
        ans.error = exc
        ans.reason = f"failed: {exc.status} {exc.code or exc.kind or ''}".rstrip()
        if child.response is None and acc.chunks:
            child.response = acc.response(jm.provider)
        failed = exc
    finally:
        ans.latency = time.perf_counter() - t0
        calls.settle(child, ans)
    ok = [a for a in answers if a.ok]
    if failed is not None:
        if sent:
            raise failed
        eng.judge_note = f"the judge {ans.reason}; decided by majority vote"
        d = eng.vote(answers)
        d.decision = "judge_failed_vote"
        eng.decision = d
        for ch in _winner_chunks(eng, d, id_, model, created):
            yield ch
        return
    eng.decision = Decision(ans, "judge_synthesis", agreement(ok), {}, message=ans.message)
