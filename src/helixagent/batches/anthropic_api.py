"""Anthropic's Message Batches API: ``POST/GET /v1/messages/batches``, ``GET/DELETE
/v1/messages/batches/{id}``, ``POST .../cancel``, ``GET .../results`` (JSONL) -- in Anthropic's shapes
(anthropic.types.messages.MessageBatch, MessageBatchIndividualResponse), tenant-scoped, run by the same
runner as OpenAI batches through the Anthropic -> canonical translation.  See docs/batches.md."""
from __future__ import annotations

import datetime as dt
import re
from typing import Any

import orjson

from ..errors import GatewayError, bad_request, not_found
from ..gateway_types import GatewayLike
from ..api.http import Request, send_bytes, send_json
from . import native
from .openai_api import _limit, _tenant, kick, store_of
from .store import BatchRow, Done, new_id, utcnow

WINDOW = "24h"  # Anthropic batches expire 24 hours after creation
_CUSTOM_ID = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
MAX_REQUESTS = 100_000


def _iso(v: dt.datetime | None) -> str | None:
    return None if v is None else v.astimezone(dt.timezone.utc).isoformat().replace("+00:00", "Z")


def batch_object(b: BatchRow, counts: dict[str, int]) -> dict[str, Any]:
    ended = b.status in ("completed", "cancelled", "expired", "failed")
    status = "ended" if ended else ("canceling" if b.status == "cancelling" else "in_progress")
    t = b.times
    end = t.get("completed_at") or t.get("cancelled_at") or t.get("expired_at") or t.get("failed_at")
    if ended:
        rc = {"processing": counts.get("pending", 0) + counts.get("running", 0),
              "succeeded": counts.get("succeeded", 0), "errored": counts.get("errored", 0),
              "canceled": counts.get("cancelled", 0), "expired": counts.get("expired", 0)}
    else:  # "zero until processing of the entire Message Batch has ended"
        rc = {"processing": b.total, "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0}
    return {"id": b.id, "type": "message_batch", "processing_status": status, "request_counts": rc,
            "created_at": _iso(t.get("created_at")), "expires_at": _iso(t.get("expires_at")),
            "ended_at": _iso(end) if ended else None, "cancel_initiated_at": _iso(t.get("cancelling_at")),
            "archived_at": _iso(t.get("archived_at")),
            "results_url": f"/v1/messages/batches/{b.id}/results" if ended else None}


def result_line(d: Done) -> dict[str, Any]:
    if d.state == "succeeded":
        res: dict[str, Any] = {"type": "succeeded", "message": d.result}
    elif d.state == "errored":
        res = {"type": "errored", "error": d.result}
    elif d.state == "expired":
        res = {"type": "expired"}
    else:
        res = {"type": "canceled"}
    return {"custom_id": d.custom_id, "result": res}


def _no_batch(bid: str) -> GatewayError:
    return GatewayError(404, f"message batch {bid!r} not found", type="not_found_error", code="not_found")


async def create(gw: GatewayLike, req: Request) -> None:
    tenant, ident = await _tenant(gw, req)
    raw = await req.body(gw.cfg.batches.max_file_bytes)
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise bad_request("the request body is not valid JSON") from None
    reqs = body.get("requests") if isinstance(body, dict) else None
    if not isinstance(reqs, list) or not reqs:
        raise bad_request("requests: a non-empty list of {custom_id, params} is required", param="requests")
    if len(reqs) > min(MAX_REQUESTS, gw.cfg.batches.max_lines):
        raise bad_request(f"requests: at most {min(MAX_REQUESTS, gw.cfg.batches.max_lines)} requests per batch",
                          param="requests")
    lines: list[tuple[str, bytes]] = []
    bodies: list[dict[str, Any]] = []
    seen: set[str] = set()
    for i, r in enumerate(reqs):
        where = f"requests.{i}"
        if not isinstance(r, dict) or set(r) - {"custom_id", "params"}:
            raise bad_request(f"{where}: an object with custom_id and params", param=where)
        cid = r.get("custom_id")
        if not isinstance(cid, str) or not _CUSTOM_ID.match(cid):
            raise bad_request(f"{where}.custom_id: 1 to 64 characters of letters, digits, '_' and '-'",
                              param=f"{where}.custom_id")
        if cid in seen:
            raise bad_request(f"{where}.custom_id: {cid!r} is used by an earlier request", param=f"{where}.custom_id")
        seen.add(cid)
        params = r.get("params")
        if not isinstance(params, dict) or not isinstance(params.get("model"), str):
            raise bad_request(f"{where}.params: a Messages API request body (with model)", param=f"{where}.params")
        if params.get("stream"):
            raise bad_request(f"{where}.params.stream: streaming is not supported in a batch",
                              param=f"{where}.params.stream")
        lines.append((cid, orjson.dumps(params)))
        bodies.append(params)
    now = utcnow()
    values: dict[str, Any] = {
        "id": new_id("msgbatch_"), "tenant": tenant, "api": "anthropic", "created_at": now,
        "endpoint": "/v1/messages", "input_file_id": None, "completion_window": WINDOW,
        "expires_at": now + dt.timedelta(hours=24), "status": "in_progress", "metadata": None, "errors": None,
        "key_id": getattr(ident, "key_id", None), "user_id": getattr(ident, "user_id", None),
        "application": getattr(ident, "application", None), "role": getattr(ident, "role", "user"), "ip": req.ip,
        "total": len(lines), "in_progress_at": now}
    values["provider"] = native.choose(gw, "anthropic", bodies)
    values["mode"] = "native" if values["provider"] else "local"
    st = store_of(gw)
    await st.create_batch(values, lines)
    kick(gw)
    got = await st.get_batch(values["id"], tenant)
    assert got is not None
    await send_json(req.send, 200, batch_object(got, await st.counts(got.id)))


async def list_batches(gw: GatewayLike, req: Request) -> None:
    tenant, _ = await _tenant(gw, req)
    st = store_of(gw)
    rows, more = await st.list_batches(tenant, "anthropic", _limit(req, 20, 1000), req.q("after_id"),
                                       req.q("before_id"))
    counts = await st.counts_many([b.id for b in rows])
    data = [batch_object(b, counts[b.id]) for b in rows]
    await send_json(req.send, 200, {"data": data, "has_more": more, "first_id": data[0]["id"] if data else None,
                                    "last_id": data[-1]["id"] if data else None})


async def by_id(gw: GatewayLike, req: Request, rest: str) -> None:
    bid, _, sub = rest.partition("/")
    tenant, _ = await _tenant(gw, req)
    st = store_of(gw)
    b = await st.get_batch(bid, tenant)
    if b is None or b.api != "anthropic" or b.times.get("archived_at") is not None:
        raise _no_batch(bid)
    ended = b.status in ("completed", "cancelled", "expired", "failed")
    if req.method == "GET" and not sub:
        await send_json(req.send, 200, batch_object(b, await st.counts(b.id)))
    elif req.method == "POST" and sub == "cancel":
        if b.status == "in_progress":
            await st.set_status(bid, tenant, ("in_progress",), "cancelling", "cancelling_at")
            kick(gw)
        got = await st.get_batch(bid, tenant)
        assert got is not None
        await send_json(req.send, 200, batch_object(got, await st.counts(bid)))
    elif req.method == "DELETE" and not sub:
        if not ended:
            raise bad_request(f"message batch {bid} is still being processed: cancel it first, and delete it once "
                              "it has ended", param="message_batch_id")
        await st.archive(bid, tenant)
        await send_json(req.send, 200, {"id": bid, "type": "message_batch_deleted"})
    elif req.method == "GET" and sub == "results":
        if not ended:
            raise bad_request(f"message batch {bid} has not ended yet: its results are not available",
                              param="message_batch_id")
        out = b"".join(orjson.dumps(result_line(d)) + b"\n" for d in await st.lines(bid))
        await send_bytes(req.send, 200, out, content_type=b"application/x-jsonl")
    else:
        raise not_found(f"no such endpoint: {req.method} {req.path}", code="unknown_url")


def install(gw: GatewayLike) -> None:
    gw.route("POST", "/v1/messages/batches", create)
    gw.route("GET", "/v1/messages/batches", list_batches)
    for m in ("GET", "POST", "DELETE"):
        gw.prefix_route(m, "/v1/messages/batches/", by_id)
