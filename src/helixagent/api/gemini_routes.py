"""Gemini-API-compatible endpoints, under ``/v1beta/`` and ``/v1/`` (the google-genai SDK calls ``v1``,
Gemini CLI ``v1beta``): ``POST models/{model}:generateContent``, ``:streamGenerateContent`` (SSE with
``?alt=sse``, else a JSON-array stream), ``:countTokens``, ``:embedContent``, ``:batchEmbedContents``,
``GET models`` and ``GET models/{model}``.

Served by any provider through the same pipeline as /v1/chat/completions and /v1/embeddings (auth,
limits, budgets, cache, routing, records, metrics); only parsing, rendering and the error shape differ.
The key is a HelixAgent key (master or virtual) in ``x-goog-api-key`` or ``?key=``; ``Authorization:
Bearer`` works too.  Errors are answered in Google's shape (``api/gemini_format.py``).  ``GET /v1/models``
and ``GET /v1/models/{id}`` are shared with the OpenAI API: a request that carries a Google key (or
Google's paging parameters) gets the Gemini answer, any other the OpenAI one."""
from __future__ import annotations

from typing import Any, AsyncIterator

import orjson

from ..errors import GatewayError
from ..gateway_types import GatewayLike, PrefixHandler
from ..pipeline import RequestContext, Stage
from ..tokens import estimate_messages
from . import gemini_format as gfmt
from .http import Request, send_json
from .openai_routes import base_headers, new_context, respond, run_embeddings, serve_chat

_PREFIXES = ("/v1beta/", "/v1/")
_PIPELINE_FLAG = "helixagent.pipeline_prefix"


def _google_request(req: Request) -> bool:
    return ("x-goog-api-key" in req.headers or "key" in req.query or "pageSize" in req.query
            or "pageToken" in req.query)


def _take_key(req: Request) -> None:
    """Present a Google-style key (``x-goog-api-key`` header, else ``?key=``) to the authenticator the way
    every route presents its key (``auth.bearer_of``): it then takes precedence over any other header."""
    key = req.headers.get("x-goog-api-key") or req.q("key")
    if key:
        req.headers.pop("authorization", None)
        req.headers["x-api-key"] = key


async def _answer_error(req: Request, exc: GatewayError) -> None:
    exc.__traceback__ = None
    req.scope["helixagent.error"] = exc   # for the access line
    await send_json(req.send, exc.status, gfmt.google_body(exc), exc.response_headers(),
                    linger=req.receive if exc.status == 413 else None)


def _headers(ctx: RequestContext) -> dict[str, str]:
    h = base_headers(ctx)
    dropped = ctx.state.get("gemini_dropped")
    if dropped:
        h[gfmt.DROPPED_HEADER] = ", ".join(dropped)
    if ctx.stream is not None and ctx.error is None and not ctx.state.get("gemini_sse"):
        h["content-type"] = "application/json; charset=utf-8"   # the JSON-array stream form
    return h


async def _generate(gw: GatewayLike, req: Request, model: str, stream: bool) -> None:
    req.scope[_PIPELINE_FLAG] = True   # the pipeline's stages write the access line
    sse = stream and req.q("alt") == "sse"
    ctx = new_context(gw, req, "chat", "gemini")
    ctx.state["gemini_sse"] = sse

    async def frames(c: RequestContext, chunks: AsyncIterator[dict[str, Any]]) -> AsyncIterator[bytes]:
        tr = gfmt.StreamRenderer(c.upstream_model or c.request.model, sse)
        async for chunk in chunks:
            out = tr.feed(chunk)
            if out:
                yield out
        yield tr.end(c.error)

    await serve_chat(gw, req, ctx, lambda raw: gfmt.parse_generate(raw, model, gw.providers, stream),
                     render=lambda c: gfmt.render_response(c.response, c.request.model), frames=frames,
                     error_body=gfmt.google_body, headers=_headers)


async def _count_tokens(gw: GatewayLike, req: Request, model: str) -> None:
    """Answered from HelixAgent's local estimate (no upstream call), like /v1/messages/count_tokens."""
    await gw.authorize(req, "completions")
    raw = await req.body(gw.cfg.server.max_body_bytes)
    creq = gfmt.parse_count(raw, model, gw.providers)
    await send_json(req.send, 200, {"totalTokens": estimate_messages(creq.messages, creq.params.get("tools"))})


async def _embed(gw: GatewayLike, req: Request, model: str, batch: bool) -> None:
    req.scope[_PIPELINE_FLAG] = True
    ctx = new_context(gw, req, "embeddings", "gemini")
    parse = gfmt.parse_batch_embed if batch else gfmt.parse_embed
    entered = await run_embeddings(gw, req, ctx, lambda raw: parse(raw, model, gw.providers))
    if entered is None:
        return
    pipeline = gw.embed_pipeline
    h = base_headers(ctx)
    if ctx.error is not None:
        h.update(ctx.error.response_headers())
        await respond(req, ctx, pipeline, entered, ctx.error.status, orjson.dumps(gfmt.google_body(ctx.error)), h)
        return
    assert ctx.response is not None, "a request without an error has a response"
    await respond(req, ctx, pipeline, entered, 200, orjson.dumps(gfmt.render_embeddings(ctx.response.body, batch)), h)


async def post_model(gw: GatewayLike, req: Request, rest: str) -> None:
    try:
        model, action = gfmt.split_target(rest)
        _take_key(req)
        if action in ("generateContent", "streamGenerateContent"):
            await _generate(gw, req, model, action == "streamGenerateContent")
        elif action == "countTokens":
            await _count_tokens(gw, req, model)
        else:
            await _embed(gw, req, model, action == "batchEmbedContents")
    except GatewayError as exc:
        await _answer_error(req, exc)


def _model_ids(gw: GatewayLike) -> list[tuple[str, Any]]:
    seen: set[str] = set()
    out = []
    for p in gw.router.ordered:
        for m in p.models():
            for mid in (m, f"{p.name}/{m}"):
                if mid not in seen:
                    seen.add(mid)
                    out.append((mid, p))
    return out


async def list_models(gw: GatewayLike, req: Request) -> None:
    try:
        _take_key(req)
        await gw.authorize(req, "models")
        ids = _model_ids(gw)
        try:
            size = min(1000, max(1, int(req.q("pageSize") or 1000)))
            start = int(req.q("pageToken") or 0)
        except ValueError:
            raise GatewayError(400, "'pageSize' and 'pageToken' must be integers", code="invalid_value",
                               param="pageSize") from None
        page = ids[start:start + size]
        body: dict[str, Any] = {"models": [gfmt.model_object(mid, p) for mid, p in page]}
        if start + size < len(ids):
            body["nextPageToken"] = str(start + size)
        await send_json(req.send, 200, body)
    except GatewayError as exc:
        await _answer_error(req, exc)


async def get_model(gw: GatewayLike, req: Request, rest: str) -> None:
    try:
        _take_key(req)
        await gw.authorize(req, "models")
        mid = rest.removeprefix("models/")
        for m, p in _model_ids(gw):
            if m == mid:
                await send_json(req.send, 200, gfmt.model_object(m, p))
                return
        raise GatewayError(404, f"models/{mid} is not found", code="model_not_found", param="model")
    except GatewayError as exc:
        await _answer_error(req, exc)


class GeminiFeatureStage(Stage):
    """After auth: fits a Gemini-format request to the provider the router will try first
    (:func:`gemini_format.adapt`): Gemini-only fields for a Gemini provider, dropped hints or a clear 400
    elsewhere.  Costs one attribute compare for other requests."""

    name = "gemini_features"

    def __init__(self, gw: GatewayLike):
        self.gw = gw

    async def pre(self, ctx: RequestContext) -> bool:
        if ctx.client_format != "gemini" or ctx.endpoint != "chat":
            return False
        native = (ctx.state.get("helix") or {}).get("gemini")
        if native is None:
            return False
        req = ctx.request
        try:
            cands = self.gw.router.candidates(req.model, req.provider)
        except GatewayError:
            return False  # unknown model / provider: the router answers it in its turn
        if cands:
            dropped = gfmt.adapt(req, native, cands[0].provider)
            if dropped:
                ctx.state["gemini_dropped"] = dropped
        return False


def _shared(google: Any, other: Any) -> Any:
    async def dispatch(gw: GatewayLike, req: Request, *rest: str) -> None:
        await (google if _google_request(req) else other)(gw, req, *rest)
    return dispatch


def install(gw: GatewayLike) -> None:
    for prefix in _PREFIXES:
        gw.prefix_route("POST", prefix + "models/", post_model)
    gw.route("GET", "/v1beta/models", list_models)
    gw.prefix_route("GET", "/v1beta/models/", get_model)
    # /v1/models and /v1/models/{id} are the OpenAI API's too: a Google-style request gets the Gemini answer
    openai_list = gw.routes.get(("GET", "/v1/models"))
    if openai_list is not None:
        gw.routes[("GET", "/v1/models")] = _shared(list_models, openai_list)
    else:
        gw.route("GET", "/v1/models", list_models)
    for i, (method, prefix, handler) in enumerate(gw.prefix_routes):
        if method == "GET" and prefix == "/v1/models/":
            shared: PrefixHandler = _shared(get_model, handler)
            gw.prefix_routes[i] = (method, prefix, shared)
            break
    else:
        gw.prefix_route("GET", "/v1/models/", get_model)
    gw.add_stage(GeminiFeatureStage(gw))
    done = gw.http_done
    if done is not None:   # prefix routes that run the pipeline: its stages write the access line
        def http_done(scope: Any, status: int, started: float, error: Any) -> None:
            if not scope.get(_PIPELINE_FLAG):
                done(scope, status, started, error)
        gw.http_done = http_done
