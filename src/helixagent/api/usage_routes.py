"""GET /v1/usage: tokens, requests, errors and cost per day, provider, model, user or application.

A caller sees only their own usage (their user id, or their key when the key has no user); an admin sees
everyone's and may filter with ``user_id=`` / ``application=``.  Under the ``multi_tenant`` feature flag a
caller's view is also confined to its key's application (``scope`` ends in ``+application``).

The numbers are read from ``database.read_url`` when it is set (store/replica.py: the replica, or the
primary when the replica is unavailable); the ``x-helixagent-read-source`` response header says which:
``primary``, ``replica`` or ``primary-fallback``."""
from __future__ import annotations

import datetime as dt

from ..errors import GatewayError
from ..gateway_types import GatewayLike
from ..store import queries
from ..store.db import DB_UNAVAILABLE, is_pool_timeout
from .http import Request, send_json
from .schemas.admin import check_usage_query

MAX_SPAN = dt.timedelta(days=3660)
DEFAULT_SPAN = dt.timedelta(days=30)
_EARLIEST = dt.datetime.min.replace(tzinfo=dt.timezone.utc)


def _bad(msg: str, param: str) -> GatewayError:
    return GatewayError(400, msg, param=param, code="invalid_request")


async def usage(gw: GatewayLike, req: Request) -> None:
    ident = await gw.authorize(req, "usage")
    store = gw.services["records"]
    now = dt.datetime.now(dt.timezone.utc)
    for name in req.query:
        if name not in ("from", "to", "group_by", "user_id", "application"):
            raise _bad(f"unknown query parameter {name!r} (use from, to, group_by, user_id, application)", name)
    q: dict[str, str] = check_usage_query({k: v[0] for k, v in req.query.items()})
    try:
        end = queries.parse_time(q["to"], "to", end=True) if q.get("to") else now
        start = queries.parse_time(q["from"], "from") if q.get("from") else None
    except ValueError as exc:
        raise _bad(str(exc), str(exc).split(":")[0]) from None
    if start is None:
        start = end - DEFAULT_SPAN if end > _EARLIEST + DEFAULT_SPAN else _EARLIEST
    if start >= end:
        raise _bad("from must be before to", "from")
    if end - start > MAX_SPAN:
        raise _bad("the range from..to may span at most 10 years", "from")
    group_by = q.get("group_by") or "day"
    user_id = q.get("user_id") or None
    application = q.get("application") or None
    key_id = None
    scope = "all"
    if ident.role != "admin":
        if ident.user_id is not None:
            if user_id is not None and user_id != ident.user_id:
                raise GatewayError(403, "you may only see your own usage", type="permission_error",
                                   code="insufficient_permissions", param="user_id")
            user_id = ident.user_id
            scope = "user"
        else:
            if user_id is not None:
                raise GatewayError(403, "you may only see your own usage", type="permission_error",
                                   code="insufficient_permissions", param="user_id")
            key_id = ident.key_id
            scope = "key"
            if key_id is None:
                raise GatewayError(403, "this key has no identity to report usage for", type="permission_error",
                                   code="insufficient_permissions")
        flags = gw.services.get("flags")
        if ident.application is not None and flags is not None and flags.multi_tenant.on(ident):
            # multi_tenant (docs/features.md): a caller sees only its own application's usage
            if application is not None and application != ident.application:
                raise GatewayError(403, "you may only see your own application's usage", type="permission_error",
                                   code="insufficient_permissions", param="application")
            application = ident.application
            scope += "+application"
    try:
        result, source = await store.reads.read(
            lambda engine: queries.usage(engine, start, end, group_by, user_id=user_id, key_id=key_id,
                                         application=application))
    except DB_UNAVAILABLE as exc:  # an outage; a bug of ours propagates (a loud 500)
        if is_pool_timeout(exc):
            db = gw.cfg.database
            raise GatewayError(503, f"every database connection is busy (database.max_open_conns: "
                               f"{db.pool_limits()[0]}) and none came free within database.pool_timeout "
                               f"({db.pool_timeout:g}s)", code="database_pool_exhausted", retryable=True) from None
        raise GatewayError(503, f"the usage database is unavailable ({type(exc).__name__})",
                           code="database_unavailable", retryable=True) from None
    result["scope"] = scope
    if user_id is not None:
        result["user_id"] = user_id
    await send_json(req.send, 200, result, {"x-helixagent-read-source": source})


def install(gw: GatewayLike) -> None:
    gw.route("GET", "/v1/usage", usage)
