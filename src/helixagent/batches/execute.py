"""One batch line through the gateway's own pipeline: the same stages as an HTTP request of that endpoint
(records, auth -- with the batch owner's identity --, limits, budgets, cache, routing, fallback), no HTTP.

The line's request id is derived from the batch, the line and its generation, so a line run again after
its instance was killed mid-way keeps its id: the completion record (``INSERT ... ON CONFLICT
(request_id) DO NOTHING``) stays one per line."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

import orjson

from ..api import anthropic_format as afmt
from ..api import openai_format as fmt
from ..api import responses_format as rfmt
from ..canonical import ChatResponse
from ..errors import GatewayError
from ..gateway_types import GatewayLike
from ..pipeline import Identity, RequestContext

log = logging.getLogger("helixagent.batches")


@dataclass(frozen=True, slots=True)
class Target:
    endpoint: str           # the pipeline's endpoint name (records, limits)
    client_format: str
    embed: bool
    parse: Callable[[bytes, Any], Any]
    render: Callable[[RequestContext], Any]
    anthropic_errors: bool = False


def _embed_render(ctx: RequestContext) -> Any:
    assert ctx.response is not None
    body = dict(ctx.response.body)
    body["provider"] = ctx.provider
    return body


def _answer(ctx: RequestContext) -> ChatResponse:
    assert isinstance(ctx.response, ChatResponse), "a request without an error has a response"
    return ctx.response


TARGETS: dict[str, Target] = {
    "/v1/chat/completions": Target("chat", "openai", False, fmt.parse_chat,
                                   lambda ctx: fmt.render_chat(_answer(ctx))),
    "/v1/completions": Target("completion", "openai", False, fmt.parse_completion,
                              lambda ctx: fmt.render_completion(_answer(ctx))),
    "/v1/embeddings": Target("embeddings", "openai", True, fmt.parse_embeddings, _embed_render),
    "/v1/responses": Target("responses", "responses", False, rfmt.parse_responses,
                            lambda ctx: rfmt.render_response(_answer(ctx), ctx.request, ctx.request_id)),
    "/v1/messages": Target("chat", "anthropic", False, afmt.parse_messages,
                           lambda ctx: afmt.render_message(_answer(ctx), ctx.request.model), True),
}


@dataclass(slots=True)
class Outcome:
    status_code: int
    body: Any
    request_id: str
    input_tokens: int
    output_tokens: int
    shutdown: bool          # cut by the gateway's shutdown: not the line's result (it is run again)
    error_type: str | None = None
    # a rate limit (ours or the upstream's, not a budget): the line is run again later, the batch paced
    pace_for: float | None = None


def request_id_of(batch_id: str, idx: int, gen: int) -> str:
    base = f"b{batch_id.split('_', 1)[-1]}{idx:08x}"
    return base if gen == 0 else f"{base}g{gen}"


def _error(t: Target, err: GatewayError) -> Any:
    return err.anthropic_body() if t.anthropic_errors else err.openai_body()


async def run_line(gw: GatewayLike, url: str, identity: Identity | GatewayError, body: bytes,
                   request_id: str, ip: str = "") -> Outcome:
    t = TARGETS[url]
    pipeline = gw.embed_pipeline if t.embed else gw.chat_pipeline
    ctx = RequestContext(t.endpoint, t.client_format, request_id=request_id)
    ctx.path = url
    ctx.ip = ip  # the address that created the batch: per-IP limits count its lines against it
    ctx.user_agent = "helixagent-batch"
    ctx.raw_body = body
    ctx.priority = "low"  # batch lines queue at the lowest priority (routing/queue.py; issue 18)
    if isinstance(identity, GatewayError):
        ctx.error = identity
        entered = await pipeline.run_rejected(ctx)
    else:
        ctx.identity = identity   # the auth stage keeps an identity set by an internal caller
        try:
            if orjson.loads(body).get("stream"):
                raise GatewayError(400, "'stream' is not supported in a batch: each line is answered whole",
                                   param="body.stream", code="invalid_value")
            parsed = t.parse(body, gw.providers)
        except GatewayError as exc:
            ctx.error = exc
            entered = await pipeline.run_rejected(ctx)
        else:
            if t.embed:
                ctx.request = parsed
            else:
                ctx.request, ctx.state["helix"] = parsed
            entered = await pipeline.run(ctx)
            if ctx.stream is not None:  # a stage answered with a stream: accumulate it
                ctx.status_sent = 200
                async for _ in pipeline.iterate(ctx, entered):
                    pass
                entered = []
    out: Any = None
    if ctx.error is None:
        try:
            out = t.render(ctx)
        except Exception as exc:  # noqa: BLE001 - a renderer bug: logged, the line's result is a 500
            log.exception("rendering the answer of batch request %s failed", request_id)
            ctx.error = GatewayError(500, f"internal error: {type(exc).__name__}", kind="internal")
    err = ctx.error
    status = 200 if err is None else err.status
    if entered:  # (a stream's end has finished it already)
        ctx.status_sent = status
        await pipeline.finish(ctx, entered)
    u = ctx.usage
    return Outcome(status, out if err is None else _error(t, err), request_id,
                   u.prompt_tokens if u is not None else 0, u.completion_tokens if u is not None else 0,
                   err is not None and err.kind == "shutdown", None if err is None else err.openai_type(),
                   _pace(err))


def _pace(err: GatewayError | None) -> float | None:
    if err is None or err.status != 429 or err.code == "budget_exceeded":
        return None
    return min(60.0, max(0.2, float(err.retry_after or 1.0)))
