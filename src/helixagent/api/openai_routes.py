"""OpenAI-compatible endpoints: /v1/chat/completions, /v1/completions, /v1/embeddings, /v1/models, /health."""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, AsyncIterator, cast

import orjson

from ..canonical import ChatResponse
from ..errors import GatewayError
from ..gateway_types import GatewayLike
from ..pipeline import Pipeline, RequestContext, Stage, shutdown_error
from . import openai_format as fmt
from .http import DisconnectWatch, Request, ResponseFailed, send_bytes, send_json, send_sse

log = logging.getLogger("helixagent.api")

_DONE = b"data: [DONE]\n\n"


def new_context(gw: GatewayLike, req: Request, endpoint: str, client_format: str = "openai") -> RequestContext:
    ctx = RequestContext(endpoint, client_format, client_request_id=req.request_id())
    ctx.method = req.method
    ctx.path = req.path
    ctx.ip = req.ip
    ctx.headers = req.headers
    ctx.user_agent = req.headers.get("user-agent", "")
    return ctx


def base_headers(ctx: RequestContext) -> dict[str, str]:
    # x-request-id echoes the client's X-Request-ID when it sent one (else it is ours); our own id, the
    # key of the completion record, is always in x-helixagent-request-id.  Values that come from the
    # client or an upstream (the model name) are made safe by http._hdrs (percent-encoded when they hold
    # anything but visible ASCII).
    h = {"x-request-id": ctx.client_request_id or ctx.request_id, "x-helixagent-request-id": ctx.request_id}
    if ctx.provider:
        h["x-helixagent-provider"] = ctx.provider
    if ctx.upstream_model:
        h["x-helixagent-model"] = ctx.upstream_model
    if ctx.attempts > 1:
        h["x-helixagent-attempts"] = str(ctx.attempts)
    h.update(ctx.response_headers)
    return h


async def respond(req: Request, ctx: RequestContext, pipeline: Pipeline, entered: list[Stage], status: int,
                  body: bytes, headers: dict[str, str]) -> None:
    """Send a whole answer (or error) of a pipeline request and finish the request once the server has
    accepted the response head, before the body goes out: the record and the metrics say what the
    client saw -- the status sent, or ``response_failed`` when the head was refused (the gauges come
    down either way).  A 413 lingers (reads what the client still sends) before the connection closes."""
    err = ctx.error
    linger = req.receive if err is not None and err.status == 413 else None

    async def started() -> None:
        ctx.status_sent = status
        await pipeline.finish(ctx, entered)

    try:
        await send_bytes(req.send, status, body, headers, linger=linger, started=started, head_block=req.head_block)
    except ResponseFailed as exc:
        response_failed(ctx, exc)
        await pipeline.finish(ctx, entered)


def response_failed(ctx: RequestContext, exc: ResponseFailed) -> None:
    log.error("request %s: %s", ctx.request_id, exc)
    ctx.error = GatewayError(500, str(exc), kind="response_failed")
    ctx.outcome = "response_failed"


async def _send_error(req: Request, ctx: RequestContext, pipeline: Pipeline, entered: list[Stage]) -> None:
    """The request's error in OpenAI's error shape, with its status and headers (retry-after, ...)."""
    assert ctx.error is not None
    h = base_headers(ctx)
    h.update(ctx.error.response_headers())
    await respond(req, ctx, pipeline, entered, ctx.error.status, orjson.dumps(ctx.error.openai_body()), h)


async def _parse(gw: GatewayLike, req: Request, ctx: RequestContext, parser: Any) -> Any:
    try:
        raw = await req.body(gw.cfg.server.max_body_bytes)
        ctx.raw_body = raw
        return parser(raw)
    except GatewayError as exc:
        ctx.error = exc
        if exc.status == 499:
            ctx.client_disconnected = True
        return None
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            task.uncancel()  # the server cancelled us (shutdown drain ended) while the body was arriving
            ctx.error = shutdown_error()
        else:
            disconnected(ctx)  # Request.body: the client went away in the middle of its body
        return None


# the renderers and SSE framers of the two OpenAI chat endpoints: module functions, not closures built
# per request (the parser closes over the gateway: gw.providers is read when the body is parsed)
def _render_chat(ctx: RequestContext) -> Any:
    return fmt.render_chat(cast(ChatResponse, ctx.response))  # set: the pipeline answered


def _render_completion(ctx: RequestContext) -> Any:
    return fmt.render_completion(cast(ChatResponse, ctx.response))


def _frames_chat(ctx: RequestContext, chunks: AsyncIterator[dict[str, Any]]) -> AsyncIterator[bytes]:
    return _sse_frames(ctx, chunks, False)


def _frames_completion(ctx: RequestContext, chunks: AsyncIterator[dict[str, Any]]) -> AsyncIterator[bytes]:
    return _sse_frames(ctx, chunks, True)


async def chat_completions(gw: GatewayLike, req: Request) -> None:
    await serve_chat(gw, req, new_context(gw, req, "chat"), lambda raw: fmt.parse_chat(raw, gw.providers),
                     render=_render_chat, frames=_frames_chat, error_body=GatewayError.openai_body)


async def completions(gw: GatewayLike, req: Request) -> None:
    await serve_chat(gw, req, new_context(gw, req, "completion"),
                     lambda raw: fmt.parse_completion(raw, gw.providers),
                     render=_render_completion, frames=_frames_completion, error_body=GatewayError.openai_body)


async def serve_chat(gw: GatewayLike, req: Request, ctx: RequestContext, parse: Any, *, render: Any, frames: Any,
                     error_body: Any, headers: Any = base_headers, on_parsed: Any = None) -> None:
    """Serve one chat-like request through the pipeline, whatever the client format: the format gives
    its parser, its renderer for a whole answer, its SSE framer for a stream and its error shape."""
    parsed = await _parse(gw, req, ctx, parse)
    pipeline = gw.chat_pipeline
    if parsed is None:  # a request that does not parse still passes the outer stages (logged, counted)
        entered = await pipeline.run_rejected(ctx)
    else:
        ctx.request, ctx.state["helix"] = parsed
        if on_parsed is not None:
            on_parsed(ctx)
        watch = DisconnectWatch(req, disconnected, ctx)
        try:
            entered = await pipeline.run(ctx)
        finally:
            watch.stop()
    if ctx.client_disconnected:  # nobody to answer: record the 499
        await pipeline.finish(ctx, entered)
        return
    if ctx.error is not None or ctx.stream is None:
        h = headers(ctx)
        if ctx.error is None:
            try:
                body = orjson.dumps(render(ctx))
            except Exception as exc:  # noqa: BLE001 - a renderer bug: logged, answered and recorded as a 500
                log.exception("rendering the answer of request %s failed", ctx.request_id)
                ctx.error = GatewayError(500, f"internal error: {type(exc).__name__}", kind="internal")
        if ctx.error is not None:
            h.update(ctx.error.response_headers())
            await respond(req, ctx, pipeline, entered, ctx.error.status, orjson.dumps(error_body(ctx.error)), h)
            return
        await respond(req, ctx, pipeline, entered, 200, body, h)
        return
    ctx.status_sent = 200
    try:
        await send_sse(req, 200, headers(ctx), frames(ctx, pipeline.iterate(ctx, entered)),
                       lambda: disconnected(ctx), lambda: cut_by_shutdown(ctx))
    except ResponseFailed as exc:
        ctx.status_sent = None
        response_failed(ctx, exc)
        await pipeline.abandon(ctx, entered)


def cut_by_shutdown(ctx: RequestContext) -> None:
    """The server cancelled a stream while a frame was being written (the client is not reading): no
    last event can reach it; the record says shutdown."""
    if ctx.error is None:
        ctx.error = shutdown_error()


def disconnected(ctx: RequestContext) -> None:
    ctx.client_disconnected = True
    if ctx.error is None:
        ctx.error = GatewayError(499, "the client closed the connection before the answer was complete",
                                 code="client_disconnected", kind="client_disconnected")


async def _sse_frames(ctx: RequestContext, chunks: AsyncIterator[dict[str, Any]], legacy: bool) -> AsyncIterator[bytes]:
    include_usage = ctx.request.include_usage
    dumps = orjson.dumps
    async for chunk in chunks:
        if "usage" in chunk and chunk["usage"] is not None and not include_usage:
            if not chunk.get("choices"):
                continue
            chunk = dict(chunk)
            chunk.pop("usage")
        if legacy:
            legacy_chunk = fmt.completion_chunk(chunk)
            if legacy_chunk is None:
                continue
            chunk = legacy_chunk
        yield b"data: " + dumps(chunk) + b"\n\n"
    if ctx.error is not None:
        yield b"data: " + dumps(ctx.error.openai_body()) + b"\n\n"
    else:
        yield _DONE


async def run_embeddings(gw: GatewayLike, req: Request, ctx: RequestContext, parser: Any) -> list[Stage] | None:
    """Parse the body with ``parser`` and run the embeddings pipeline (any client format); None when the
    client left meanwhile (the request is finished and recorded then), else the stages entered."""
    parsed = await _parse(gw, req, ctx, parser)
    pipeline = gw.embed_pipeline
    if parsed is None:
        entered = await pipeline.run_rejected(ctx)
    else:
        ctx.request = parsed
        watch = DisconnectWatch(req, disconnected, ctx)  # a client that leaves while queued leaves the queue
        try:
            entered = await pipeline.run(ctx)
        finally:
            watch.stop()
    if ctx.client_disconnected:
        await pipeline.finish(ctx, entered)
        return None
    return entered


async def embeddings(gw: GatewayLike, req: Request) -> None:
    ctx = new_context(gw, req, "embeddings")
    entered = await run_embeddings(gw, req, ctx, lambda raw: fmt.parse_embeddings(raw, gw.providers))
    if entered is None:
        return
    pipeline = gw.embed_pipeline
    if ctx.error is not None:
        await _send_error(req, ctx, pipeline, entered)
        return
    assert ctx.response is not None, "a request without an error has a response"
    body = ctx.response.body
    if ctx.request.params.get("encoding_format") == "base64":
        # providers that only produce floats (mock, Gemini): encode as OpenAI does, little-endian float32
        import array
        import base64
        import sys
        for d in body.get("data") or ():
            vec = d.get("embedding")
            if isinstance(vec, list):
                a = array.array("f", vec)
                if sys.byteorder != "little":
                    a.byteswap()
                d["embedding"] = base64.b64encode(a.tobytes()).decode()
    body["provider"] = ctx.provider
    await respond(req, ctx, pipeline, entered, 200, orjson.dumps(body), base_headers(ctx))


async def list_models(gw: GatewayLike, req: Request) -> None:
    await gw.authorize(req, "models")
    created = int(gw.started_at)
    seen: set[str] = set()
    data = []
    for p in gw.router.ordered:
        for m in p.models():
            for mid in (m, f"{p.name}/{m}"):
                if mid in seen:
                    continue
                seen.add(mid)
                data.append({"id": mid, "object": "model", "created": created, "owned_by": p.name})
    for alias in gw.cfg.routing.aliases:
        if alias not in seen:
            seen.add(alias)
            data.append({"id": alias, "object": "model", "created": created, "owned_by": "helixagent"})
    for name in gw.cfg.ensembles:  # named ensembles (docs/ensemble.md)
        data.append({"id": f"ensemble/{name}", "object": "model", "created": created, "owned_by": "helixagent"})
    await send_json(req.send, 200, {"object": "list", "data": data})


async def get_model(gw: GatewayLike, req: Request, model_id: str) -> None:
    await gw.authorize(req, "models")
    for p in gw.router.ordered:
        for m in p.models():
            if model_id in (m, f"{p.name}/{m}"):
                await send_json(req.send, 200, {"id": model_id, "object": "model", "created": int(gw.started_at),
                                                "owned_by": p.name})
                return
    if model_id.startswith("ensemble/") and model_id[len("ensemble/"):] in gw.cfg.ensembles:
        await send_json(req.send, 200, {"id": model_id, "object": "model", "created": int(gw.started_at),
                                        "owned_by": "helixagent"})
        return
    raise GatewayError(404, f"the model {model_id!r} does not exist", code="model_not_found", param="model")


async def health(gw: GatewayLike, req: Request) -> None:
    """Liveness for everyone (the seed's `curl -f http://localhost:7061/health` health check sends no
    key); with a key of any role, also each provider's state.  A wrong key is still a 401."""
    # "degraded": no provider can answer, or the answers come from mock stand-ins (no upstream key)
    if req.bearer() is None and not gw.services["auth"].open:
        await send_json(req.send, 200, {"status": "degraded" if gw.mock_fallback else "ok", "version": gw.version})
        return
    await gw.authorize(req, "health")
    providers = {}
    for name, p in gw.providers.items():
        info: dict[str, Any] = {"type": p.cfg.type, "enabled": p.cfg.enabled, "priority": p.cfg.priority,
                                "models": p.models()}
        stand_in = getattr(p, "stand_in_for", None)
        if stand_in:
            info["stand_in_for"] = stand_in
        state = gw.services.get("health")
        if state is not None:
            info.update(state.describe(name))
        q = gw.router.queues.get(name)
        if q is not None:  # its concurrency cap: slots in use, waiting by priority (routing/queue.py)
            info["queue"] = q.snapshot()
        providers[name] = info
    status = "ok" if any(p.cfg.enabled for p in gw.providers.values()) and not gw.mock_fallback else "degraded"
    body: dict[str, Any] = {"status": status, "version": gw.version, "environment": gw.cfg.environment,
                            "uptime_seconds": round(time.time() - gw.started_at, 3),
                            "mock_fallback": gw.mock_fallback, "providers": providers}
    reloader = gw.services.get("reload")
    if reloader is not None:  # generation, loaded_at, source, last reload, restart_required (reload.py)
        body["config"] = reloader.status()
    shared = gw.services.get("shared_health")  # breakers and cooldowns shared through Redis (shared_health.py)
    body["shared_health"] = shared.status() if shared is not None else {"enabled": False}
    await send_json(req.send, 200, body)


def install(gw: GatewayLike) -> None:
    gw.route("POST", "/v1/chat/completions", chat_completions, pipeline=True)
    gw.route("POST", "/v1/completions", completions, pipeline=True)
    gw.route("POST", "/v1/embeddings", embeddings, pipeline=True)
    gw.route("GET", "/v1/models", list_models)
    gw.route("GET", "/health", health)
    gw.prefix_route("GET", "/v1/models/", get_model)
    # convenience aliases without the /v1 prefix, as several SDKs and tools call them
    gw.route("POST", "/chat/completions", chat_completions, pipeline=True)
    gw.route("POST", "/completions", completions, pipeline=True)
    gw.route("POST", "/embeddings", embeddings, pipeline=True)
    gw.route("GET", "/models", list_models)
