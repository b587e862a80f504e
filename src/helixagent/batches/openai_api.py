"""The OpenAI Files and Batches APIs: ``POST/GET /v1/files``, ``GET/DELETE /v1/files/{id}``,
``GET /v1/files/{id}/content``; ``POST/GET /v1/batches``, ``GET /v1/batches/{id}``,
``POST /v1/batches/{id}/cancel`` -- in OpenAI's shapes (openai.types.FileObject, Batch), tenant-scoped.
See docs/batches.md."""
from __future__ import annotations

import datetime as dt
from typing import Any

import orjson

from ..config import parse_duration
from ..errors import GatewayError, bad_request, not_found
from ..gateway_types import GatewayLike
from ..api.http import Request, send_bytes, send_json
from ..store.responses import tenant_of
from . import native
from .jsonl import ENDPOINTS, parse_input
from .multipart import read_form
from .store import BatchRow, BatchStore, Done, FileRow, new_id, unix, utcnow

EXPIRED_MSG = "This request could not be executed before the completion window expired."
CANCELLED_MSG = "This request was not executed: the batch was cancelled."


def file_object(f: FileRow) -> dict[str, Any]:
    return {"id": f.id, "object": "file", "bytes": f.bytes, "created_at": unix(f.created_at),
            "filename": f.filename, "purpose": f.purpose, "status": "processed", "expires_at": None,
            "status_details": None}


def batch_object(b: BatchRow, counts: dict[str, int]) -> dict[str, Any]:
    done = counts.get("succeeded", 0)
    failed = counts.get("errored", 0) + counts.get("expired", 0) + counts.get("cancelled", 0)
    i, o = counts.get("input_tokens", 0), counts.get("output_tokens", 0)
    return {
        "id": b.id, "object": "batch", "endpoint": b.endpoint,
        "errors": {"object": "list", "data": b.errors} if b.errors else None,
        "input_file_id": b.input_file_id, "completion_window": b.completion_window, "status": b.status,
        "output_file_id": b.output_file_id, "error_file_id": b.error_file_id,
        "created_at": b.at("created_at"), "in_progress_at": b.at("in_progress_at"),
        "expires_at": b.at("expires_at"), "finalizing_at": b.at("finalizing_at"),
        "completed_at": b.at("completed_at"), "failed_at": b.at("failed_at"), "expired_at": b.at("expired_at"),
        "cancelling_at": b.at("cancelling_at"), "cancelled_at": b.at("cancelled_at"),
        "request_counts": {"total": b.total, "completed": done, "failed": failed},
        "usage": {"input_tokens": i, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": o,
                  "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": i + o},
        "metadata": b.metadata,
    }


def build_files(b: BatchRow, lines: list[Done]) -> tuple[bytes, bytes]:
    """The output file (the lines answered 2xx) and the error file (the rest), as OpenAI writes them."""
    out: list[bytes] = []
    err: list[bytes] = []
    for d in lines:
        rid = f"batch_req_{b.id[6:]}{d.idx:08x}"
        if d.state in ("succeeded", "errored"):
            row = {"id": rid, "custom_id": d.custom_id, "response": {"status_code": d.status_code,
                                                                     "request_id": d.request_id, "body": d.result},
                   "error": None}
            (out if d.state == "succeeded" else err).append(orjson.dumps(row))
        else:
            code, msg = ("batch_expired", EXPIRED_MSG) if d.state == "expired" else ("batch_cancelled", CANCELLED_MSG)
            err.append(orjson.dumps({"id": rid, "custom_id": d.custom_id, "response": None,
                                     "error": {"code": code, "message": msg}}))
    return (b"\n".join(out) + b"\n" if out else b""), (b"\n".join(err) + b"\n" if err else b"")


def store_of(gw: GatewayLike) -> BatchStore:
    st: BatchStore | None = gw.services.get("batches_store")
    if st is None:
        raise GatewayError(503, "batches need the database (the records store)", code="batches_unavailable")
    return st


async def _tenant(gw: GatewayLike, req: Request) -> tuple[str, Any]:
    ident = await gw.authorize(req, "completions")
    return tenant_of(ident), ident


def _limit(req: Request, default: int = 20, top: int = 100) -> int:
    raw = req.q("limit", str(default)) or str(default)
    if not raw.isdigit() or not 1 <= int(raw) <= top:
        raise bad_request(f"'limit' must be an integer between 1 and {top}", param="limit", code="invalid_value")
    return int(raw)


# -- files --------------------------------------------------------------------------------------------------
async def upload(gw: GatewayLike, req: Request) -> None:
    tenant, _ = await _tenant(gw, req)
    cfg = gw.cfg.batches
    parts = await read_form(req, cfg.max_file_bytes)
    unknown = set(parts) - {"purpose", "file"}
    if unknown:
        raise bad_request(f"unknown form field(s): {', '.join(sorted(unknown))}", param=sorted(unknown)[0],
                          code="invalid_request")
    purpose = parts.get("purpose")
    if purpose is None or purpose.filename is not None:
        raise bad_request("the form field 'purpose' is required", param="purpose", code="invalid_request")
    if purpose.data.decode("utf-8", "replace") != "batch":
        raise bad_request("'purpose' must be 'batch' (the only purpose this gateway stores files for)",
                          param="purpose", code="invalid_value")
    f = parts.get("file")
    if f is None or f.filename is None:
        raise bad_request("the form field 'file' (a file part with a filename) is required", param="file",
                          code="invalid_request")
    content = bytes(f.data)
    parse_input(content, cfg.max_lines)
    name = f.filename[:255] or "upload.jsonl"
    row = await store_of(gw).add_file(tenant, "batch", name, content)
    await send_json(req.send, 200, file_object(row))


async def list_files(gw: GatewayLike, req: Request) -> None:
    tenant, _ = await _tenant(gw, req)
    order = req.q("order", "desc") or "desc"
    if order not in ("asc", "desc"):
        raise bad_request("'order' must be 'asc' or 'desc'", param="order", code="invalid_value")
    rows, more = await store_of(gw).list_files(tenant, req.q("purpose"), _limit(req, 10000, 10000),
                                               req.q("after"), order)
    data = [file_object(r) for r in rows]
    await send_json(req.send, 200, {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                                    "last_id": data[-1]["id"] if data else None, "has_more": more})


def _no_file(fid: str) -> GatewayError:
    return not_found(f"No such File object: {fid}", code="not_found", param="file_id")


async def file_by_id(gw: GatewayLike, req: Request, rest: str) -> None:
    fid, _, sub = rest.partition("/")
    tenant, _ = await _tenant(gw, req)
    st = store_of(gw)
    if req.method == "DELETE" and not sub:
        if not await st.delete_file(fid, tenant):
            raise _no_file(fid)
        await send_json(req.send, 200, {"id": fid, "object": "file", "deleted": True})
    elif req.method == "GET" and not sub:
        row = await st.get_file(fid, tenant)
        if row is None:
            raise _no_file(fid)
        await send_json(req.send, 200, file_object(row))
    elif req.method == "GET" and sub == "content":
        data = await st.file_content(fid, tenant)
        if data is None:
            raise _no_file(fid)
        await send_bytes(req.send, 200, data, content_type=b"application/octet-stream")
    else:
        raise not_found(f"no such endpoint: {req.method} {req.path}", code="unknown_url")


# -- batches ------------------------------------------------------------------------------------------------
def _metadata(v: Any) -> dict[str, str] | None:
    if v is None:
        return None
    if not isinstance(v, dict) or len(v) > 16:
        raise bad_request("'metadata' must be an object of at most 16 string pairs", param="metadata",
                          code="invalid_value")
    for k, x in v.items():
        if not isinstance(x, str) or len(k) > 64 or len(x) > 512:
            raise bad_request("'metadata': keys are strings of at most 64 characters, values strings of at most "
                              "512", param="metadata", code="invalid_value")
    return v


async def create_batch(gw: GatewayLike, req: Request) -> None:
    tenant, ident = await _tenant(gw, req)
    cfg = gw.cfg.batches
    raw = await req.body(gw.cfg.server.max_body_bytes)
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise bad_request("the request body is not valid JSON", code="invalid_json") from None
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object", code="invalid_request")
    unknown = set(body) - {"input_file_id", "endpoint", "completion_window", "metadata", "output_expires_after"}
    if unknown:
        raise bad_request(f"unknown parameter: {sorted(unknown)[0]}", param=sorted(unknown)[0],
                          code="unknown_parameter")
    fid = body.get("input_file_id")
    if not isinstance(fid, str) or not fid:
        raise bad_request("'input_file_id' is required", param="input_file_id", code="missing_required_parameter")
    endpoint = body.get("endpoint")
    if endpoint not in ENDPOINTS:
        raise bad_request(f"'endpoint' must be one of {', '.join(ENDPOINTS)}", param="endpoint",
                          code="invalid_value")
    window = body.get("completion_window")
    if window not in cfg.completion_windows:
        raise bad_request(f"'completion_window' must be one of {', '.join(cfg.completion_windows)} "
                          "(batches.completion_windows)", param="completion_window", code="invalid_value")
    meta = _metadata(body.get("metadata"))
    st = store_of(gw)
    content = await st.file_content(fid, tenant)
    f = await st.get_file(fid, tenant) if content is not None else None
    if content is None or f is None:
        raise _no_file(fid)
    if f.purpose != "batch":
        raise bad_request(f"the file {fid} has purpose {f.purpose!r}, not 'batch'", param="input_file_id",
                          code="invalid_value")
    now = utcnow()
    lines = parse_input(content, cfg.max_lines)
    errors = [{"code": "invalid_url", "line": n, "param": "url",
               "message": f"the line's url {o['url']} is not the batch's endpoint {endpoint}"}
              for n, o in lines if o["url"] != endpoint][:100]
    values: dict[str, Any] = {
        "id": new_id("batch_"), "tenant": tenant, "api": "openai", "created_at": now, "endpoint": endpoint,
        "input_file_id": fid, "completion_window": window,
        "expires_at": now + dt.timedelta(seconds=parse_duration(window)),
        "status": "failed" if errors else "in_progress", "metadata": orjson.dumps(meta).decode() if meta else None,
        "errors": orjson.dumps(errors).decode() if errors else None,
        "key_id": getattr(ident, "key_id", None), "user_id": getattr(ident, "user_id", None),
        "application": getattr(ident, "application", None), "role": getattr(ident, "role", "user"), "ip": req.ip,
        "total": 0 if errors else len(lines), ("failed_at" if errors else "in_progress_at"): now}
    if not errors:
        values["provider"] = native.choose(gw, "openai", [o["body"] for _, o in lines])
        values["mode"] = "native" if values["provider"] else "local"
    await st.create_batch(values, [] if errors else [(o["custom_id"], orjson.dumps(o["body"])) for _, o in lines])
    kick(gw)
    got = await st.get_batch(values["id"], tenant)
    assert got is not None
    await send_json(req.send, 200, batch_object(got, await st.counts(got.id)))


def kick(gw: GatewayLike) -> None:
    runner = gw.services.get("batches_runner")
    if runner is not None:
        runner.kick()


def _no_batch(bid: str) -> GatewayError:
    return not_found(f"No batch found with id '{bid}'.", code="not_found", param="batch_id")


async def list_batches(gw: GatewayLike, req: Request) -> None:
    tenant, _ = await _tenant(gw, req)
    st = store_of(gw)
    rows, more = await st.list_batches(tenant, "openai", _limit(req), req.q("after"))
    counts = await st.counts_many([b.id for b in rows])
    data = [batch_object(b, counts[b.id]) for b in rows]
    await send_json(req.send, 200, {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                                    "last_id": data[-1]["id"] if data else None, "has_more": more})


async def batch_by_id(gw: GatewayLike, req: Request, rest: str) -> None:
    bid, _, sub = rest.partition("/")
    tenant, _ = await _tenant(gw, req)
    st = store_of(gw)
    b = await st.get_batch(bid, tenant)
    if b is None or b.api != "openai":
        raise _no_batch(bid)
    if req.method == "GET" and not sub:
        pass
    elif req.method == "POST" and sub == "cancel":
        if b.status not in ("in_progress", "cancelling", "validating"):
            raise GatewayError(409, f"Cannot cancel a batch with status '{b.status}'.", code="conflict")
        if b.status != "cancelling":
            await st.set_status(bid, tenant, ("in_progress", "validating"), "cancelling", "cancelling_at")
            kick(gw)
        b = await st.get_batch(bid, tenant)
        assert b is not None
    else:
        raise not_found(f"no such endpoint: {req.method} {req.path}", code="unknown_url")
    await send_json(req.send, 200, batch_object(b, await st.counts(b.id)))


def install(gw: GatewayLike) -> None:
    gw.route("POST", "/v1/files", upload)
    gw.route("GET", "/v1/files", list_files)
    for m in ("GET", "DELETE"):
        gw.prefix_route(m, "/v1/files/", file_by_id)
    gw.route("POST", "/v1/batches", create_batch)
    gw.route("GET", "/v1/batches", list_batches)
    for m in ("GET", "POST"):
        gw.prefix_route(m, "/v1/batches/", batch_by_id)
