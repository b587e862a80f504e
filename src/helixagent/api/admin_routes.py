"""Key management API (admin role only).

    POST /admin/keys                    {"user_id", "application", "role", "expires_in": "30d" | "expires_at",
                                         "limits": {...}}  -> 201, the key's record plus "key" (shown once)
    GET  /admin/keys[?user_id=&application=]               -> {"object": "list", "data": [...]}
    POST /admin/keys/{id}/rotate        {"grace": "24h"}   -> 201, the new key (secret shown once) + "previous"
    POST /admin/keys/{id}/revoke                           -> 200, the revoked key's record
"""
from __future__ import annotations

import datetime as dt
from typing import Any, Callable

from ..config import parse_duration
from ..errors import GatewayError, bad_request
from ..gateway_types import GatewayLike
from .http import Request, send_json
from .openai_format import load_json_object
from .schemas.admin import MAX_DURATION, check_create_key, check_keys_query, check_rotate

DEFAULT_GRACE = 24 * 3600.0


def _name(body: dict[str, Any], *names: str) -> str | None:
    for n in names:   # the schema made each a non-empty string of at most 255 characters, or absent
        v = body.get(n)
        if v is not None:
            return str(v).strip()
    return None


def _duration(v: float | str, name: str) -> float:
    """Seconds from a number or a string such as 30d; bounded so that every datetime it makes exists."""
    try:
        d = parse_duration(v)
    except ValueError as exc:
        raise bad_request(f"'{name}': {exc}", param=name, code="invalid_value") from None
    if not 0 <= d <= MAX_DURATION:
        raise bad_request(f"'{name}' must be between 0 and 100 years; got {v!r}", param=name, code="invalid_value")
    return d


def expiry_of(body: dict[str, Any]) -> dt.datetime | None:
    if body.get("expires_in") is not None:
        return dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=_duration(body["expires_in"], "expires_in"))
    v = body.get("expires_at")
    if v is None:
        return None
    try:
        t = dt.datetime.fromisoformat(v.replace("Z", "+00:00"))
        # stored and compared in UTC: a time whose UTC form does not exist is no expiry
        return t.replace(tzinfo=dt.timezone.utc) if t.tzinfo is None else t.astimezone(dt.timezone.utc)
    except (ValueError, OverflowError):
        raise bad_request(f"'expires_at': {v!r} is not an ISO 8601 timestamp between 0001 and 9999",
                          param="expires_at", code="invalid_value") from None


async def _body(gw: GatewayLike, req: Request, check: Callable[[Any], Any], required: bool = True) -> dict[str, Any]:
    """The JSON body checked against its declared schema (``schemas/admin.py``)."""
    raw = await req.body(gw.cfg.server.max_body_bytes)
    if not raw and not required:
        return {}
    body: dict[str, Any] = check(load_json_object(raw))
    return body


async def create_key(gw: GatewayLike, req: Request) -> None:
    await gw.authorize(req, "admin")
    body = await _body(gw, req, check_create_key)
    store = gw.services["keys"]
    rec, secret = await store.create(user_id=_name(body, "user_id", "user"),
                                     application=_name(body, "application", "app"),
                                     role=body.get("role") or "user",
                                     expires_at=expiry_of(body), limits=body.get("limits"))
    await gw.services["auth"].changed([rec.id])
    out = rec.public()
    out["key"] = secret
    await send_json(req.send, 201, out, {"cache-control": "no-store"})


async def list_keys(gw: GatewayLike, req: Request) -> None:
    await gw.authorize(req, "admin")
    q = check_keys_query({k: v[0] for k, v in req.query.items()})
    recs = await gw.services["keys"].list(user_id=q.get("user_id"), application=q.get("application"))
    await send_json(req.send, 200, {"object": "list", "data": [r.public() for r in recs]})


async def key_action(gw: GatewayLike, req: Request, rest: str) -> None:
    await gw.authorize(req, "admin")
    key_id, _, action = rest.partition("/")
    store = gw.services["keys"]
    auth = gw.services["auth"]
    if not key_id or action not in ("rotate", "revoke"):
        raise GatewayError(404, f"no such endpoint: POST {req.path} (use /admin/keys/{{id}}/rotate or "
                                f"/admin/keys/{{id}}/revoke)", code="unknown_url")
    if action == "revoke":
        rec = await store.revoke(key_id)
        await auth.changed([rec.id])
        await send_json(req.send, 200, rec.public())
        return
    body = await _body(gw, req, check_rotate, required=False)
    grace = _duration(body["grace"], "grace") if body.get("grace") is not None else DEFAULT_GRACE
    new, secret, old = await store.rotate(key_id, grace)
    await auth.changed([old.id, new.id])
    out = new.public()
    out["key"] = secret
    out["previous"] = old.public()
    await send_json(req.send, 201, out, {"cache-control": "no-store"})


async def get_or_delete_key(gw: GatewayLike, req: Request, rest: str) -> None:
    """GET /admin/keys/{id} shows one key; DELETE /admin/keys/{id} revokes it (same as POST .../revoke)."""
    await gw.authorize(req, "admin")
    if not rest or "/" in rest:
        raise GatewayError(404, f"no such endpoint: {req.method} {req.path}", code="unknown_url")
    store = gw.services["keys"]
    if req.method == "DELETE":
        rec = await store.revoke(rest)
        await gw.services["auth"].changed([rec.id])
        await send_json(req.send, 200, rec.public())
        return
    await send_json(req.send, 200, (await store.get_or_404(rest)).public())


def install(gw: GatewayLike) -> None:
    gw.route("POST", "/admin/keys", create_key)
    gw.route("GET", "/admin/keys", list_keys)
    gw.prefix_route("POST", "/admin/keys/", key_action)
    gw.prefix_route("GET", "/admin/keys/", get_or_delete_key)
    gw.prefix_route("DELETE", "/admin/keys/", get_or_delete_key)
