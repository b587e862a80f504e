"""Hedged execution: a second candidate is started when the first has not answered within its recent
p95 latency; the first answer wins and the losers are cancelled (and their streams closed)."""
from __future__ import annotations

import asyncio
import functools
import time
from typing import TYPE_CHECKING, Any

from ..canonical import ChatRequest
from ..config import HedgingConfig
from ..errors import GatewayError
from ..pipeline import RequestContext
from .attempts import _aclose
from .health import DENIED, NORMAL
from .mapping import _Mapped
from .plan import Candidate

if TYPE_CHECKING:
    from .router import Router

_perf = time.perf_counter


async def hedged(self: Router, ctx: RequestContext, cands: list[Candidate], req: ChatRequest,
                  hcfg: HedgingConfig, m: _Mapped | None = None) -> tuple[Candidate, Any]:
    """Race candidates: start the next one when the newest has not answered within its p95 latency
    (at least ``min_delay_ms``), at most ``max_extra`` extra; the first answer wins and the others
    are cancelled.  A failed attempt is replaced by the next candidate at once (no same-provider
    retry in hedged mode)."""
    op = "stream" if req.stream else "chat"
    if m is None:
        m = _Mapped(self, req, op)
    mapped = m
    deadline = self.clock() + self.budget
    tasks: dict[asyncio.Task[Any], Candidate] = {}
    idx = 0
    extra = 0
    last: GatewayError | None = None
    last_launch = 0.0
    hedge_delay: float | None = None
    cooling: GatewayError | None = None
    counters = self.counters
    floor = hcfg.min_delay_ms / 1000.0

    def launch(hedge: bool) -> bool:
        nonlocal idx, last_launch, hedge_delay, cooling
        while idx < len(cands):
            c = cands[idx]
            idx += 1
            now = self.clock()
            until = c.throttle.until  # type: ignore[union-attr]
            if until > now:  # in a Retry-After cooldown: hedged mode does not wait
                cooling = self._cooling(c, until - now, cooling)
                continue
            try:
                sub, wire, _ = mapped.get(c)
            except GatewayError as exc:
                if ctx.provider is None:
                    ctx.provider = c.name
                mapped.skip(c, exc)  # it cannot serve the request as asked: the next one may
                continue
            h = c.health
            probe = h.acquire(now)  # type: ignore[union-attr]
            if probe == DENIED:
                continue
            sprobe = NORMAL
            if req.stream:
                sprobe = h.stream.acquire(now)  # type: ignore[union-attr]
                if sprobe == DENIED:
                    h.cancelled(probe)  # type: ignore[union-attr]
                    continue
            ctx.attempts += 1
            counters["attempts"] += 1
            if ctx.candidates_tried:
                if hedge:
                    counters["hedges"] += 1
                else:
                    ctx.fallbacks += 1
                    counters["fallbacks"] += 1
            ctx.candidates_tried.append(c.name)
            if c.queue is not None:
                from .queue import queued_attempt
                t = asyncio.ensure_future(queued_attempt(self, ctx, c, sub, op, deadline, probe, wire, sprobe))
            else:
                t = asyncio.ensure_future(self._attempt(c, sub, op, deadline - now, probe, wire, sprobe))
            tasks[t] = c
            last_launch = now
            stats = c.health.ttfb if req.stream else c.health.full  # type: ignore[union-attr]
            hedge_delay = max(floor, stats.p95() or 0.0) if stats.count >= hcfg.min_samples else None
            return True
        return False

    started = _perf()
    if not launch(False):
        raise m.named(cooling or self._unavailable(m.unskipped(cands), self.clock(), req.stream))
    try:
        while tasks:
            now = self.clock()
            wait = deadline - now
            can_hedge = extra < hcfg.max_extra and idx < len(cands) and hedge_delay is not None
            if can_hedge:
                wait = min(wait, last_launch + hedge_delay - now)  # type: ignore[operator]
            done, _ = await asyncio.wait(tasks, timeout=max(0.0, wait), return_when=asyncio.FIRST_COMPLETED)
            if not done:
                if self.clock() >= deadline:
                    raise m.named(last or self._budget_error())
                if can_hedge:
                    extra += 1
                    ctx.state["hedged"] = extra
                    launch(True)
                continue
            for t in done:
                c = tasks.pop(t)
                exc = t.exception()
                if exc is None:
                    ctx.upstream_latency = _perf() - started
                    return c, t.result()
                if not isinstance(exc, GatewayError) or not exc.retryable:
                    ctx.provider = c.name
                    raise exc
                last = exc
                ctx.provider = c.name
            if not tasks and not launch(False):
                break
    finally:
        for t, lc in tasks.items():  # the losers
            t.cancel()
            t.add_done_callback(functools.partial(_reap, lc))
    assert last is not None
    raise m.named(last)


def _reap(c: Candidate, t: asyncio.Task[Any]) -> None:
    """Done-callback of a cancelled hedge loser: retrieve its outcome; close a stream it opened anyway
    (and free its stream-breaker probe: an abandoned stream gives no verdict)."""
    if t.cancelled():
        return
    exc = t.exception()
    if exc is None:
        res = t.result()
        if isinstance(res, tuple) and len(res) == 3 and hasattr(res[1], "aclose"):
            c.health.stream.cancelled(res[2])  # type: ignore[union-attr]
            asyncio.ensure_future(_aclose(res[1]))
