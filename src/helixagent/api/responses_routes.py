"""The OpenAI Responses API: ``POST /v1/responses`` (served through the chat pipeline like every client
format: auth, limits, budgets, cache, routing, records), ``GET``/``DELETE /v1/responses/{id}``,
``POST /v1/responses/{id}/cancel``, ``GET /v1/responses/{id}/input_items`` and
``POST /v1/responses/input_tokens``.  Errors in OpenAI's error shape; a failure mid-stream is an ``error``
event followed by ``response.failed``.  See docs/responses.md."""
from __future__ import annotations

from typing import Any, AsyncIterator

from ..errors import GatewayError, bad_request, not_found
from ..gateway_types import GatewayLike
from ..pipeline import RequestContext, Stage
from ..store.responses import ResponseStore, tenant_of
from ..tokens import estimate_messages
from . import responses_format as rfmt
from .http import Request, send_json
from .openai_routes import new_context, serve_chat

_FINAL = "responses_final"


def _store(gw: GatewayLike) -> ResponseStore | None:
    st = gw.services.get("responses_store")
    if st is None:
        rec = gw.services.get("records")
        if rec is None:
            return None
        st = gw.services["responses_store"] = ResponseStore(rec.engine, rec.keyring)
    return st


async def create(gw: GatewayLike, req: Request) -> None:
    await serve_chat(gw, req, new_context(gw, req, "responses", "responses"),
                     lambda raw: rfmt.parse_responses(raw, gw.providers),
                     render=_render, frames=_frames, error_body=GatewayError.openai_body)


def _render(ctx: RequestContext) -> dict[str, Any]:
    assert ctx.response is not None, "a request without an error has a response"
    out = rfmt.render_response(ctx.response, ctx.request, ctx.request_id)
    ctx.state[_FINAL] = out
    return out


async def _frames(ctx: RequestContext, chunks: AsyncIterator[dict[str, Any]]) -> AsyncIterator[bytes]:
    tr = rfmt.StreamTranslator(ctx.request, ctx.request_id, ctx.upstream_model or ctx.request.model)
    async for chunk in chunks:
        out = tr.feed(chunk)
        if tr.native_final is not None:
            ctx.state[_FINAL] = tr.native_final
        if out:
            yield out
    yield tr.end(ctx.error)


def input_item_ids(items: list[dict[str, Any]], rid: str) -> list[dict[str, Any]]:
    """This turn's input items as the API lists them: every item with an id, messages with a content list."""
    out = []
    for i, it in enumerate(items):
        it = dict(it)
        t = it.setdefault("type", "message")
        if t == "message":
            c = it.get("content")
            if isinstance(c, str):
                it["content"] = [{"type": "input_text" if it.get("role") != "assistant" else "output_text",
                                  "text": c, **({"annotations": []} if it.get("role") == "assistant" else {})}]
            it.setdefault("status", "completed")
        if not it.get("id"):
            it["id"] = f"{'msg' if t == 'message' else 'item'}_{rid[5:]}_{i}"
        out.append(it)
    return out


class ResponsesStage(Stage):
    """After auth (the tenant is known): rebuilds the conversation of ``previous_response_id`` from the store,
    decides native (OpenAI) or translated for the router's first choice -- a translated request that needs
    OpenAI (built-in tools, OpenAI-only items) is a clear 400 naming the parameter -- and, in its post-hook,
    stores the response.  Costs one attribute compare for other requests."""

    name = "responses"

    def __init__(self, gw: GatewayLike):
        self.gw = gw

    async def pre(self, ctx: RequestContext) -> bool:
        if ctx.client_format != "responses":
            return False
        req: rfmt.ResponsesRequest = ctx.request
        tenant = tenant_of(ctx.identity)
        ctx.state["responses_tenant"] = tenant
        try:
            cands = self.gw.router.candidates(req.model, req.provider)
        except GatewayError:
            cands = []  # unknown model / provider: the router answers it in its turn
        first = cands[0].provider if cands else None
        native = first is not None and rfmt.is_native(first)
        history: list[dict[str, Any]] = []
        if req.previous_response_id:
            store = _store(self.gw)
            prev = await store.get(req.previous_response_id, tenant) if store is not None else None
            if prev is None and not native:
                raise GatewayError(404, f"Previous response with id '{req.previous_response_id}' not found.",
                                   code="previous_response_not_found", param="previous_response_id")
            if prev is not None:
                history = prev.conversation()
                msgs = rfmt.items_to_messages(history, [], "previous")
                k = 1 if req.messages and req.messages[0]["role"] == "system" and req.echo.get("instructions") else 0
                req.messages[k:k] = msgs
                if native and not prev.native:  # OpenAI does not know it: send the conversation itself
                    body = dict(req.native)
                    body.pop("previous_response_id", None)
                    body["input"] = rfmt.items_for_openai(history) + req.input_items
                    req.native = body
        ctx.state["responses_history"] = history
        if first is not None and not native:
            err = rfmt.translation_error(req, first)
            if err is not None:
                raise err
            if first.cfg.wire not in ("anthropic", "mock"):
                for m in req.messages:
                    m.pop("thinking_blocks", None)
            elif first.cfg.wire == "anthropic" and req.params.get("reasoning_effort") not in (None, "none", "minimal"):
                req.params.setdefault("thinking", {"type": "adaptive"})  # reasoning asked: Claude thinks
            if req.params.get("reasoning_effort") in ("none", "minimal") and first.cfg.wire != "openai":
                req.params.pop("reasoning_effort")
        return False

    async def post(self, ctx: RequestContext) -> None:
        if ctx.client_format != "responses" or ctx.error is not None or ctx.client_disconnected:
            return
        req = ctx.request
        if not isinstance(req, rfmt.ResponsesRequest) or not req.store:
            return
        final = ctx.state.get(_FINAL)
        if final is None and ctx.response is not None:  # a translated stream: the accumulated answer
            final = rfmt.render_response(ctx.response, req, ctx.request_id)
        store = _store(self.gw)
        if not isinstance(final, dict) or store is None or not isinstance(final.get("id"), str):
            return
        rid = final["id"]
        # (a config reload may have removed the provider while this request ran: then not native)
        prov = self.gw.providers.get(ctx.provider) if ctx.provider is not None else None
        native = prov is not None and rfmt.is_native(prov)
        await store.save(rid=rid, tenant=ctx.state.get("responses_tenant", ""), request_id=ctx.request_id,
                         provider=ctx.provider, model=ctx.upstream_model, status=str(final.get("status") or ""),
                         native=native, previous=req.previous_response_id,
                         history=ctx.state.get("responses_history") or [],
                         input_items=input_item_ids(req.input_items, rid), response=final)


async def _tenant(gw: GatewayLike, req: Request) -> str:
    return tenant_of(await gw.authorize(req, "completions"))


def _missing(rid: str) -> GatewayError:
    return not_found(f"Response with id '{rid}' not found.", code="not_found", param="response_id")


async def by_id(gw: GatewayLike, req: Request, rest: str) -> None:
    """GET /v1/responses/{id}, GET /v1/responses/{id}/input_items, DELETE /v1/responses/{id},
    POST /v1/responses/{id}/cancel."""
    rid, _, sub = rest.partition("/")
    tenant = await _tenant(gw, req)
    store = _store(gw)
    if store is None or not rid:
        raise _missing(rid)
    if req.method == "DELETE" and not sub:
        if not await store.delete(rid, tenant):
            raise _missing(rid)
        await send_json(req.send, 200, {"id": rid, "object": "response", "deleted": True})
        return
    got = await store.get(rid, tenant)
    if got is None:
        raise _missing(rid)
    if req.method == "GET" and not sub:
        await send_json(req.send, 200, got.response)
    elif req.method == "GET" and sub == "input_items":
        await send_json(req.send, 200, _page(req, got.input_items))
    elif req.method == "POST" and sub == "cancel":
        if got.status in ("queued", "in_progress"):
            raise GatewayError(409, "this response is being served by another request; it cannot be cancelled "
                                    "from here", code="conflict")
        raise bad_request("Cannot cancel a synchronous response.", code="invalid_request")
    else:
        raise not_found(f"no such endpoint: {req.method} {req.path}", code="unknown_url")


def _page(req: Request, items: list[dict[str, Any]]) -> dict[str, Any]:
    order = req.q("order", "desc")
    if order not in ("asc", "desc"):
        raise bad_request("'order' must be 'asc' or 'desc'", param="order", code="invalid_value")
    raw_limit = req.q("limit", "20") or "20"
    if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= 100:
        raise bad_request("'limit' must be an integer between 1 and 100", param="limit", code="invalid_value")
    limit = int(raw_limit)
    seq = list(reversed(items)) if order == "desc" else list(items)
    after = req.q("after")
    if after:
        ids = [it.get("id") for it in seq]
        if after not in ids:
            raise bad_request(f"'after': no input item {after!r} in this response", param="after",
                              code="invalid_value")
        seq = seq[ids.index(after) + 1:]
    data = seq[:limit]
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": len(seq) > limit}


async def input_tokens(gw: GatewayLike, req: Request) -> None:
    """POST /v1/responses/input_tokens: the local estimate of the input's tokens (no upstream call)."""
    tenant = await _tenant(gw, req)
    raw = await req.body(gw.cfg.server.max_body_bytes)
    creq, _ = rfmt.parse_responses(raw, gw.providers, count_only=True)
    if creq.previous_response_id:
        store = _store(gw)
        prev = await store.get(creq.previous_response_id, tenant) if store is not None else None
        if prev is None:
            raise GatewayError(404, f"Previous response with id '{creq.previous_response_id}' not found.",
                               code="previous_response_not_found", param="previous_response_id")
        creq.messages[0:0] = rfmt.items_to_messages(prev.conversation(), [], "previous")
    n = estimate_messages(creq.messages, creq.params.get("tools"))
    await send_json(req.send, 200, {"object": "response.input_tokens", "input_tokens": n})


def install(gw: GatewayLike) -> None:
    gw.route("POST", "/v1/responses", create, pipeline=True)
    gw.route("POST", "/v1/responses/input_tokens", input_tokens)
    for method in ("GET", "DELETE", "POST"):
        gw.prefix_route(method, "/v1/responses/", by_id)
    gw.route("POST", "/responses", create, pipeline=True)
    gw.add_stage(ResponsesStage(gw))
