"""Member calls and the panel's wait.

Each member call is a child request of the ensemble's: its own ``RequestContext`` (request id
``<ensemble id>.<n>``, the caller's identity) served by ``Router.handle_pinned`` -- the router's normal call
path for one provider/model (mapping, breaker, retries, cost) without fallback -- and recorded as a record of
its own (endpoint ``ensemble_member``, ``ensemble_id`` = the parent's id).

The panel waits up to ``panel_timeout_ms``.  It stops early when the strategy can decide (a majority that the
answers still out cannot overturn, or every member in), or when ``min_providers`` can no longer be met; the
members still working are cancelled and reported as left out, with why."""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Callable

from ..canonical import ChatRequest, ChatResponse, Usage
from ..errors import GatewayError
from ..pipeline import RequestContext, outcome_of
from ..routing.router import Router
from .answers import ANSWERED, Answer, logprob_confidence
from .spec import Member, Spec

log = logging.getLogger("helixagent.ensemble")

MEMBER_ENDPOINT = "ensemble_member"
LOGPROB_WIRES = ("openai",)  # the wire formats whose chat API returns token logprobs
_CUT_REASONS = {"timeout": "panel_timeout_ms ran out before it answered",
                "decided": "not needed: the panel had decided",
                "hopeless": "not needed: too many members had failed to reach min_providers",
                "aborted": "the ensemble request ended first (its client left, or the gateway shut down)"}


class Calls:
    """The child calls of one ensemble request: numbering, records, usage and cost totals."""

    def __init__(self, router: Router, parent: RequestContext, record: Callable[[RequestContext], None] | None,
                 limiter: Any = None):
        self.router = router
        self.limiter = limiter
        self.limits_cost: float | None = 0.0  # the real total at the limits' prices (None: one is unknown)
        self.parent = parent
        self.record = record
        self.n = 0
        self.usage = Usage()
        self.cost = 0.0
        self.all: list[Answer] = []
        self.cut: dict[tuple[int, int], str] = {}   # (member index, round) -> "timeout" | "decided"

    def child(self, req: ChatRequest, member: Member, stream: bool) -> RequestContext:
        self.n += 1
        p = self.parent
        ctx = RequestContext(MEMBER_ENDPOINT, p.client_format, request_id=f"{p.request_id}.{self.n}")
        ctx.method, ctx.path, ctx.ip, ctx.user_agent = p.method, p.path, p.ip, p.user_agent
        ctx.identity = p.identity
        ctx.priority = p.priority  # the members queue at the client's priority (routing/queue.py)
        ctx.state["ensemble_id"] = p.request_id
        ctx.request = ChatRequest(model=member.model, messages=req.messages, params=dict(req.params),
                                  stream=stream, include_usage=stream, provider=member.provider, endpoint="chat")
        return ctx

    def settle(self, ctx: RequestContext, ans: Answer) -> None:
        """Count a finished child call and write its record."""
        if ctx.finished_at is None:
            ctx.finished_at = time.perf_counter()
        if ctx.usage is None and ctx.response is not None:
            ctx.usage = getattr(ctx.response, "usage", None)
        u = ctx.usage
        if u is not None:
            self.usage.prompt_tokens += u.prompt_tokens
            self.usage.completion_tokens += u.completion_tokens
            self.usage.total_tokens += u.total_tokens or (u.prompt_tokens + u.completion_tokens)
            if self.limiter is not None and self.limits_cost is not None:
                lp = self.limiter.price(ans.member.provider, ans.member.model)
                if lp is None:
                    self.limits_cost = None
                else:
                    self.limits_cost += lp[0] * u.prompt_tokens + lp[1] * u.completion_tokens
        self.cost += ctx.cost or 0.0
        ans.usage = u
        ans.cost = ctx.cost if ctx.cost else None
        ans.request_id = ctx.request_id
        if ctx.error is not None:
            ctx.status = ctx.error.status
        ctx.outcome = outcome_of(ctx)
        self.all.append(ans)
        if self.record is not None:
            self.record(ctx)

    async def call(self, req: ChatRequest, member: Member, rnd: int = 1) -> Answer:
        """One non-streamed member call; never raises a GatewayError (a failure is an Answer saying why)."""
        ctx = self.child(req, member, False)
        ans = Answer(member, "failed", round=rnd)
        t0 = time.perf_counter()
        try:
            await self.router.handle_pinned(ctx)
            resp = ctx.response
            assert isinstance(resp, ChatResponse), "a non-streamed call answers a ChatResponse"
            ans.status = ANSWERED
            ans.response = resp
            ans.confidence = logprob_confidence(resp.body)
        except GatewayError as exc:
            ctx.error = exc
            ans.error = exc
            ans.reason = f"failed: {exc.status} {exc.code or exc.kind or ''}".rstrip()
        except asyncio.CancelledError:
            why = self.cut.get((member.index, rnd), "aborted")
            ans.status = "timeout" if why == "timeout" else "cancelled"
            ans.reason = _CUT_REASONS[why]
            ctx.error = GatewayError(499, ans.reason, code="ensemble_left_out", kind="ensemble_left_out")
            ans.latency = time.perf_counter() - t0
            self.settle(ctx, ans)
            raise
        ans.latency = time.perf_counter() - t0
        self.settle(ctx, ans)
        return ans


def member_request(req: ChatRequest, member: Member, spec: Spec) -> ChatRequest:
    """The request a member receives: the caller's, plus token logprobs for confidence_weighted from the
    members whose API returns them (unless the caller set logprobs itself)."""
    if spec.strategy == "confidence_weighted" and member.wire in LOGPROB_WIRES and "logprobs" not in req.params:
        params = dict(req.params)
        params["logprobs"] = True
        return ChatRequest(model=req.model, messages=req.messages, params=params, provider=req.provider)
    return req


async def run_panel(calls: Calls, spec: Spec, members: list[Member], make_req: Callable[[Member], ChatRequest],
                    rnd: int = 1, settled: Callable[[list[Answer], int], bool] | None = None) -> list[Answer]:
    """Call ``members`` at once; return every member's Answer (answered, failed, timeout or cancelled)."""
    loop = asyncio.get_running_loop()
    tasks: dict[asyncio.Task[Answer], Member] = {
        asyncio.ensure_future(calls.call(make_req(m), m, rnd)): m for m in members}
    deadline = loop.time() + spec.timeout
    results: list[Answer] = []
    pending: set[asyncio.Task[Answer]] = set(tasks)
    aborted = hopeless = False
    try:
        while pending:
            left = deadline - loop.time()
            if left <= 0:
                break
            done, pending = await asyncio.wait(pending, timeout=left, return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                results.append(t.result())
            ok = sum(1 for a in results if a.ok)
            if ok + len(pending) < spec.min_providers:
                hopeless = True  # min_providers can no longer be met
                break
            if settled is not None and pending and settled(results, len(pending)):
                break
    except asyncio.CancelledError:
        aborted = True  # the ensemble request itself ended (its client left, or the shutdown drain ran out)
        raise
    finally:
        if pending:
            why = ("aborted" if aborted else "hopeless" if hopeless else "timeout" if loop.time() >= deadline
                   else "decided")
            for t in pending:
                calls.cut[(tasks[t].index, rnd)] = why
                t.cancel()
            gone = await asyncio.gather(*pending, return_exceptions=True)
            for g in gone:
                if isinstance(g, Answer):
                    results.append(g)  # answered just as it was cancelled
    cut = [a for a in calls.all if a.round == rnd and a.status in ("timeout", "cancelled")
           and all(a is not r for r in results)]
    results.extend(cut)
    results.sort(key=lambda a: a.member.index)
    return results

