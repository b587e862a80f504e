"""OpenAI-compatible endpoints: /v1/chat/completions, /v1/completions, /v1/embeddings, /v1/models, /health."""
from __future__ import annotations

import time
from typing import Any, AsyncIterator

import orjson

from ..errors import GatewayError
from ..gateway_types import GatewayLike
from ..pipeline import RequestContext
from . import openai_format as fmt
from .http import DisconnectWatch, Request, send_bytes, send_json, send_sse

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
    # key of the completion record, is always in x-helixagent-request-id.
    h = {"x-request-id": ctx.client_request_id or ctx.request_id, "x-helixagent-request-id": ctx.request_id}
    if ctx.provider:
        h["x-helixagent-provider"] = ctx.provider
    if ctx.upstream_model:
        h["x-helixagent-model"] = ctx.upstream_model
    if ctx.attempts > 1:
        h["x-helixagent-attempts"] = str(ctx.attempts)
    h.update(ctx.response_headers)
    return h


async def _send_error(req: Request, ctx: RequestContext) -> None:
    """The request's error in OpenAI's error shape, with its status and headers (retry-after, ...)."""
    err = ctx.error
    assert err is not None, "_send_error is only called for a failed request"
    h = base_headers(ctx)
    h.update(err.response_headers())
    await send_bytes(req.send, err.status, orjson.dumps(err.openai_body()), h)


async def _parse(gw: GatewayLike, req: Request, ctx: RequestContext, parser: Any) -> Any:
    try:
        raw = await req.body(gw.cfg.server.max_body_bytes)
        ctx.raw_body = raw
        return parser(raw)
    except GatewayError as exc:
        ctx.error = exc
        return None


async def chat_completions(gw: GatewayLike, req: Request) -> None:
    await _serve_chat(gw, req, "chat", fmt.parse_chat)


async def completions(gw: GatewayLike, req: Request) -> None:
    await _serve_chat(gw, req, "completion", fmt.parse_completion)


async def _serve_chat(gw: GatewayLike, req: Request, endpoint: str, parser: Any) -> None:
    legacy = endpoint == "completion"
    await serve_chat(
        gw, req, new_context(gw, req, endpoint), lambda raw: parser(raw, gw.providers),
        render=lambda ctx: fmt.render_completion(ctx.response) if legacy else fmt.render_chat(ctx.response),
        frames=lambda ctx, chunks: _sse_frames(ctx, chunks, legacy),
        error_body=GatewayError.openai_body)


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
        await pipeline.finish(ctx, entered)
        h = headers(ctx)
        if ctx.error is not None:
            h.update(ctx.error.response_headers())
            await send_bytes(req.send, ctx.error.status, orjson.dumps(error_body(ctx.error)), h)
            return
        await send_bytes(req.send, 200, orjson.dumps(render(ctx)), h)
        return
    await send_sse(req, 200, headers(ctx), frames(ctx, pipeline.iterate(ctx, entered)), lambda: disconnected(ctx))


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


async def embeddings(gw: GatewayLike, req: Request) -> None:
    ctx = new_context(gw, req, "embeddings")
    parsed = await _parse(gw, req, ctx, lambda raw: fmt.parse_embeddings(raw, gw.providers))
    pipeline = gw.embed_pipeline
    if parsed is None:
        entered = await pipeline.run_rejected(ctx)
    else:
        ctx.request = parsed
        entered = await pipeline.run(ctx)
    await pipeline.finish(ctx, entered)
    if ctx.error is not None:
        await _send_error(req, ctx)
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
    await send_bytes(req.send, 200, orjson.dumps(body), base_headers(ctx))


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
    await send_json(req.send, 200, {"object": "list", "data": data})


async def get_model(gw: GatewayLike, req: Request, model_id: str) -> None:
    await gw.authorize(req, "models")
    for p in gw.router.ordered:
        for m in p.models():
            if model_id in (m, f"{p.name}/{m}"):
                await send_json(req.send, 200, {"id": model_id, "object": "model", "created": int(gw.started_at),
                                                "owned_by": p.name})
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
        providers[name] = info
    status = "ok" if any(p.cfg.enabled for p in gw.providers.values()) and not gw.mock_fallback else "degraded"
    await send_json(req.send, 200, {"status": status, "version": gw.version, "environment": gw.cfg.environment,
                                    "uptime_seconds": round(time.time() - gw.started_at, 3),
                                    "mock_fallback": gw.mock_fallback, "providers": providers})


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
