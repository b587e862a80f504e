"""Ordering one request's candidates (strategy, per-request cost limit, open breakers left out,
Retry-After cooldowns last) and the errors for a request no candidate is left for."""
from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any

from ..canonical import ChatRequest
from ..errors import GatewayError
from ..tokens import estimate_messages
from .health import OPEN
from .plan import Candidate, Plan

if TYPE_CHECKING:
    from .router import Router


def order(self: Router, plan: Plan, req: Any, stream: bool = False, prompt_tokens: int = 0) -> list[Candidate]:
    """The candidates for this request, best first: strategy order, cost limits, open breakers out.
    ``prompt_tokens``: the prompt estimate when an earlier stage already made it (0 = count here)."""
    strategy = plan.route.strategy
    prim = plan.primary
    est: tuple[int, int] | None = None
    if plan.needs_estimate and isinstance(req, ChatRequest):
        mt = req.max_tokens
        est = (prompt_tokens or estimate_messages(req.messages, req.params.get("tools")),
               mt if mt is not None else self.rcfg.estimate_completion_tokens)
    if strategy == "priority" or len(prim) < 2:
        seq = plan.all if not plan.fallback else prim + plan.fallback
    else:
        if strategy == "cost":
            pt, ct = est if est is not None else (1, 1)
            inf = float("inf")
            prim = sorted(prim, key=lambda c: inf if c.price is None else c.price[0] * pt + c.price[1] * ct)
        elif strategy == "latency":
            prim = sorted(prim, key=lambda c: c.health.latency(stream))  # type: ignore[union-attr]  # fleet's when shared
        elif strategy == "weighted":
            rnd = random.random
            prim = sorted(prim, key=lambda c: -(rnd() ** (1.0 / c.weight)) if c.weight > 0 else 1.0)
        seq = prim + plan.fallback
    now = self.clock()
    out: list[Candidate] = []
    over: list[str] | None = None
    benched: list[Candidate] | None = None
    for c in seq:
        h = c.health
        if not h.available(now) or stream and not h.stream.available(now):  # type: ignore[union-attr]
            continue
        lim = c.per_request_limit
        if lim is not None and est is not None and c.price is not None:
            cost = c.price[0] * est[0] + c.price[1] * est[1]
            if cost > lim:
                if over is None:
                    over = []
                over.append(f"{c.name}/{c.model} ~{cost:.6g} > {lim:.6g}")
                continue
        if c.throttle.until > now:  # type: ignore[union-attr]  # in a Retry-After cooldown: last
            if benched is None:
                benched = []
            benched.append(c)
            continue
        out.append(c)
    if benched is not None:
        if len(benched) > 1:
            benched.sort(key=lambda c: c.throttle.until)  # type: ignore[union-attr]
        out += benched
    if not out:
        raise self._nothing_left(plan, over, now, stream)
    return out


def nothing_left(self: Router, plan: Plan, over: list[str] | None, now: float, stream: bool = False) -> GatewayError:
    if not plan.all or (over and all(c.health.available(now) and (  # type: ignore[union-attr]
            not stream or c.health.stream.available(now)) for c in plan.all)):  # type: ignore[union-attr]
        why = list(plan.priced_out) + list(over or ())
        return GatewayError(400, "no provider can serve this request within the configured cost limits ("
                            + "; ".join(why) + ")", code="cost_limit_exceeded", kind="cost_limit")
    return self._unavailable(plan.all, now, stream)


def unavailable(self: Router, cands: list[Candidate], now: float, stream: bool = False) -> GatewayError:
    waits = []
    for c in cands:
        for b in (c.health, c.health.stream) if stream else (c.health,):  # type: ignore[union-attr]
            if b.state is OPEN:  # type: ignore[union-attr]
                waits.append(b.cfg.cooldown - (now - b.opened_at))  # type: ignore[union-attr]
    what = "stream circuit breaker" if stream and not any(
        c.health.state is OPEN for c in cands) else "circuit breaker"  # type: ignore[union-attr]
    return GatewayError(503, f"every provider for this model is unavailable ({what} open: "
                        + ", ".join(c.name for c in cands) + ")", type="service_unavailable",
                        code="providers_unavailable", retry_after=max(0.0, min(waits)) if waits else None,
                        kind="breaker_open")


def cooling(self: Router, c: Candidate, wait: float, prev: GatewayError | None) -> GatewayError:
    """The answer for a candidate skipped because of its Retry-After cooldown (no upstream call).
    When several are skipped, the client learns the soonest any of them is free again."""
    if prev is not None and prev.kind == "rate_limit_cooldown" and prev.retry_after <= wait:  # type: ignore[operator]
        return prev
    t = c.throttle
    assert t is not None
    rl = t.status == 429
    return GatewayError(t.status, f"provider {c.name!r} is {'rate limited' if rl else 'overloaded'} for model "
                        f"{c.model!r}: the upstream asked to retry after {wait:.3g} s",
                        type="rate_limit_error" if rl else "service_unavailable",
                        code="upstream_rate_limited" if rl else "upstream_overloaded", provider=c.name,
                        retryable=True, retry_after=wait, kind="rate_limit_cooldown")
