"""A request's priority in the provider queues (routing/queue.py) and whose fair share it counts against.

The priority is, in this order: what the caller set on ``RequestContext.priority`` before running the
pipeline (the batch runner: ``low``); the ``x-helixagent-priority`` header (``high``, ``normal`` or ``low``;
anything else is a 400 naming the header); the key's default (``limits.priority`` of a virtual key); else
``normal``.  A key's ``limits.max_priority`` caps it: a higher ask is lowered to the cap (a policy, not an
error), and a request that sent the header learns what it got from the ``x-helixagent-priority`` response
header.  The stage runs right after authentication, so a bad header is refused before limits, cache or any
upstream call.
"""
from __future__ import annotations

from typing import Any

from ..errors import GatewayError
from ..pipeline import PRIORITIES, Priority, RequestContext, Stage

HEADER = "x-helixagent-priority"
RANK: dict[str, int] = {p: i for i, p in enumerate(PRIORITIES)}  # 0 = high, served first


def _limit(ident: Any, name: str) -> Priority | None:
    if ident is None:
        return None
    v = (ident.limits or {}).get(name)
    return v if isinstance(v, str) and v in RANK else None  # type: ignore[return-value]


def resolve(ctx: RequestContext) -> Priority:
    """The request's effective priority (see the module docstring); raises the 400 for a bad header."""
    ident = ctx.identity
    asked: Priority | None = ctx.priority
    sent = False
    if asked is None:
        raw = ctx.headers.get(HEADER)
        if raw is not None:
            v = raw.strip().lower()
            if v not in RANK:
                raise GatewayError(400, f"the {HEADER} header must be one of high, normal or low", param=HEADER,
                                   code="invalid_header")
            asked = v  # type: ignore[assignment]
            sent = True
    if asked is None:
        asked = _limit(ident, "priority") or "normal"
    cap = _limit(ident, "max_priority")
    if cap is not None and RANK[asked] < RANK[cap]:
        asked = cap
    if sent:
        ctx.response_headers[HEADER] = asked
    return asked


def flow_of(ctx: RequestContext, fair_share: str) -> tuple[str, float]:
    """(the flow whose share the request counts against, the request's weight) for routing.queue.fair_share
    ``api_key`` / ``user`` / ``application``.  Without that attribute (the master key, no key at all, a key
    with no user) the flow is the key's id, else one shared anonymous flow."""
    ident = ctx.identity
    if ident is None:
        return "-", 1.0
    who = ident.key_id
    if fair_share == "user" and ident.user_id:
        who = "u:" + ident.user_id
    elif fair_share == "application" and ident.application:
        who = "a:" + ident.application
    w = (ident.limits or {}).get("queue_weight")
    weight = float(w) if isinstance(w, (int, float)) and not isinstance(w, bool) and w > 0 else 1.0
    return who or "-", weight


class PriorityStage(Stage):
    name = "priority"

    async def pre(self, ctx: RequestContext) -> bool:
        ctx.priority = resolve(ctx)
        return False
