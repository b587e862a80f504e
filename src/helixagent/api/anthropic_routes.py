"""Anthropic-compatible endpoints: POST /v1/messages and POST /v1/messages/count_tokens.

Served through the same pipeline as /v1/chat/completions (auth, limits, cache, routing, records); only
the parsing and the rendering differ.  Errors are answered in Anthropic's shape
(``{"type": "error", "error": {"type", "message"}}``), mid-stream failures as an ``error`` SSE event."""
from __future__ import annotations

from typing import Any, AsyncIterator
from urllib.parse import urlencode

from ..errors import GatewayError
from ..gateway_types import GatewayLike
from ..pipeline import RequestContext, Stage
from ..routing.adapt import add_dropped
from ..tokens import estimate_messages
from . import anthropic_format as afmt
from .http import Request, send_json
from .openai_routes import base_headers, new_context, serve_chat


def _headers(ctx: RequestContext) -> dict[str, str]:
    h = base_headers(ctx)
    h["request-id"] = ctx.request_id  # what Anthropic clients read (the SDK's ``_request_id``)
    return h


_MAX_NAMED = 32  # a header names at most this many dropped fields (then "+N more")


async def messages(gw: GatewayLike, req: Request) -> None:
    beta = req.headers.get("anthropic-beta")
    # ``?beta=true`` (the SDK's ``client.beta.messages``, Claude Code): re-encoded, sent on to Anthropic only
    query = urlencode([(k, v) for k, vs in req.query.items() for v in vs]) if req.query else None

    def on_parsed(ctx: RequestContext) -> None:
        if beta:
            ctx.state["anthropic_beta"] = beta
            ctx.request.anthropic_beta = beta  # sent on by Anthropic providers only
        if query:
            ctx.request.anthropic_query = query

    await serve_chat(gw, req, new_context(gw, req, "chat", "anthropic"),
                     lambda raw: afmt.parse_messages(raw, gw.providers),
                     render=lambda ctx: afmt.render_message(ctx.response, ctx.request.model),
                     frames=_sse_frames, error_body=GatewayError.anthropic_body, headers=_headers,
                     on_parsed=on_parsed)


async def _sse_frames(ctx: RequestContext, chunks: AsyncIterator[dict[str, Any]]) -> AsyncIterator[bytes]:
    tr = afmt.StreamTranslator(ctx.upstream_model or ctx.request.model, ctx.request.messages)
    async for chunk in chunks:
        out = tr.feed(chunk)
        if out:
            yield out
    yield tr.end(ctx.error)


async def count_tokens(gw: GatewayLike, req: Request) -> None:
    """Anthropic's token counting endpoint, answered from HelixAgent's local estimate (no upstream call)."""
    await gw.authorize(req, "completions")
    raw = await req.body(gw.cfg.server.max_body_bytes)
    creq, _ = afmt.parse_messages(raw, gw.providers, count_only=True)
    n = estimate_messages(creq.messages, creq.params.get("tools"))
    await send_json(req.send, 200, {"input_tokens": n})


class AnthropicFeatureStage(Stage):
    """After auth: makes a /v1/messages request fit the provider the router will try first when that is not
    an Anthropic one (:func:`anthropic_format.adapt_for`: a clear 400 for what would change the answer's
    meaning, the rest mapped or dropped and named in ``x-helixagent-dropped-params``).  An Anthropic
    provider gets everything as sent.  Costs one attribute compare for other requests."""

    name = "anthropic_features"

    def __init__(self, gw: GatewayLike):
        self.gw = gw

    async def pre(self, ctx: RequestContext) -> bool:
        if ctx.client_format != "anthropic":
            return False
        info = (ctx.state.get("helix") or {}).get("anthropic")
        req = ctx.request
        if not info or not (info["features"] or info["lower"] or info["native"] or req.extra):
            return False
        try:
            cands = self.gw.router.candidates(req.model, req.provider)
        except GatewayError:
            return False  # unknown model / provider: the router answers it in its turn
        if not cands:
            return False
        first = cands[0].provider
        wire = first.cfg.wire
        if wire == "anthropic":
            return False
        if wire == "mock":  # the mock accepts everything (and ignores it)
            if info["lower"]:
                afmt.lower_for_openai(req)
            return False
        dropped = afmt.adapt_for(req, info, first, cands[0].model)
        if dropped:
            more = len(dropped) - _MAX_NAMED
            names = ",".join(dropped[:_MAX_NAMED]) + (f",+{more} more" if more > 0 else "")
            add_dropped(ctx.response_headers, names.split(","))  # merged with what routing adapts later
        return False


def install(gw: GatewayLike) -> None:
    gw.route("POST", "/v1/messages", messages, pipeline=True)
    gw.route("POST", "/v1/messages/count_tokens", count_tokens)
    gw.add_stage(AnthropicFeatureStage(gw))
