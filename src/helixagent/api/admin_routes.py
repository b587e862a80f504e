"""Key management API (admin role only).

    POST /admin/keys                    {"user_id", "application", "role", "expires_in": "30d" | "expires_at",
                                         "limits": {...}}  -> 201, the key's record plus "key" (shown once)
    GET  /admin/keys[?user_id=&application=]               -> {"object": "list", "data": [...]}
    POST /admin/keys/{id}/rotate        {"grace": "24h"}   -> 201, the new key (secret shown once) + "previous"
    POST /admin/keys/{id}/revoke                           -> 200, the revoked key's record
"""
from __future__ import annotations

import datetime as dt
from typing import Any

from ..config import parse_duration
from ..errors import GatewayError, bad_request
from ..gateway_types import GatewayLike
from .http import Request, send_json
from .openai_format import load_json_object

DEFAULT_GRACE = 24 * 3600.0


def _str_field(body: dict[str, Any], *names: str) -> str | None:
    for n in names:
        v = body.get(n)
        if v is None:
            continue
        if not isinstance(v, str) or not v.strip() or len(v) > 255:
            raise bad_request(f"'{n}' must be a non-empty string of at most 255 characters", param=n,
                              code="invalid_value")
        return v.strip()
    return None


def _duration(v: Any, name: str) -> float:
    try:
        d = parse_duration(v)
    except ValueError as exc:
        raise bad_request(f"'{name}': {exc}", param=name, code="invalid_value") from None
    if d < 0:
        raise bad_request(f"'{name}' must not be negative", param=name, code="invalid_value")
    return d


def expiry_of(body: dict[str, Any]) -> dt.datetime | None:
    if body.get("expires_in") is not None:
        return dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=_duration(body["expires_in"], "expires_in"))
    v = body.get("expires_at")
    if v is None:
        return None
    if not isinstance(v, str):
        raise bad_request("'expires_at' must be an ISO 8601 timestamp", param="expires_at", code="invalid_type")
    try:
        t = dt.datetime.fromisoformat(v.replace("Z", "+00:00"))
    except ValueError:
        raise bad_request(f"'expires_at': {v!r} is not an ISO 8601 timestamp", param="expires_at",
                          code="invalid_value") from None
    return t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc)


async def _body(gw: GatewayLike, req: Request, required: bool = True) -> dict[str, Any]:
    raw = await req.body(gw.cfg.server.max_body_bytes)
    if not raw and not required:
        return {}
    return load_json_object(raw)


async def create_key(gw: GatewayLike, req: Request) -> None:
    await gw.authorize(req, "admin")
    body = await _body(gw, req)
    role = body.get("role", "user")
    store = gw.services["keys"]
    rec, secret = await store.create(user_id=_str_field(body, "user_id", "user"),
                                     application=_str_field(body, "application", "app"),
                                     role=role if isinstance(role, str) else repr(role),
                                     expires_at=expiry_of(body), limits=body.get("limits"))
    await gw.services["auth"].changed([rec.id])
    out = rec.public()
    out["key"] = secret
    await send_json(req.send, 201, out, {"cache-control": "no-store"})


async def list_keys(gw: GatewayLike, req: Request) -> None:
    await gw.authorize(req, "admin")
    recs = await gw.services["keys"].list(user_id=req.q("user_id"), application=req.q("application"))
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
    body = await _body(gw, req, required=False)
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
