"""Embedding coalescing (``routing.embedding_coalesce``; docs/routing.md, "Embedding coalescing").

Concurrent embedding requests for the same model (and pinned provider), with the same parameters
(``dimensions``, ``encoding_format``, ``user``, ...) and the same kind of input (strings or token arrays),
that arrive within ``window_ms`` of the first are sent upstream as one call and split back.  Each request
has already passed its own stages (auth, limits, cache) and its own mapping check, so only inputs every
member's provider accepts are combined; the combined call goes through the router as any request does
(queue slot, retries, fallback, breaker verdicts: one per upstream call, not per member).

Split: the vectors in order, each member's ``index`` renumbered from 0.  Usage: the upstream's total is
divided between the members in proportion to the tokens of their inputs (token arrays: their length;
text: the gateway's estimate, ``tokens.estimate_text``), by largest remainder, so the members' tokens add
up to exactly what the upstream counted (a lone request keeps the upstream's number).  Cost follows each
member's share; each member keeps its own record.

Failure: a combined call refused as a bad request (a non-retryable 4xx: most likely one member's input,
e.g. too long for the model) is not held against the others -- every member is then sent on its own, so
only the culprit gets the 400.  Any other failure (after routing's own retries and fallback) is every
member's answer, each with its own copy of the error: retrying one by one would multiply the load on an
upstream that is failing already.  A member whose task is cancelled before the call leaves the batch.
"""
from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

import orjson

from ..canonical import EmbeddingRequest, EmbeddingResponse, Usage
from ..config import EmbeddingCoalesceConfig
from ..errors import GatewayError
from ..pipeline import PRIORITIES, RequestContext
from ..tokens import estimate_text
from . import costs
from .priority import RANK

if TYPE_CHECKING:
    from .router import Plan, Router

log = logging.getLogger("helixagent.routing")

ALONE: Any = object()  # a member's answer: run your request on your own


class _Member:
    __slots__ = ("ctx", "req", "fut", "gone")

    def __init__(self, ctx: RequestContext, req: EmbeddingRequest, fut: asyncio.Future[Any]):
        self.ctx = ctx
        self.req = req
        self.fut = fut
        self.gone = False


class _Batch:
    __slots__ = ("key", "plan", "members", "count", "handle", "flushed")

    def __init__(self, key: tuple[Any, ...], plan: "Plan"):
        self.key = key
        self.plan = plan
        self.members: list[_Member] = []
        self.count = 0
        self.handle: asyncio.TimerHandle | None = None
        self.flushed = False


class Coalescer:
    def __init__(self, router: "Router", cfg: EmbeddingCoalesceConfig):
        self.router = router
        self.window = cfg.window_ms / 1000.0
        self.max_inputs = cfg.max_inputs
        self.open: dict[tuple[Any, ...], _Batch] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        # counters: upstream calls made for combined batches, and the requests they answered
        self.calls = 0
        self.members = 0

    def accepts(self, req: EmbeddingRequest) -> bool:
        return 0 < len(req.input) < self.max_inputs

    @staticmethod
    def key(req: EmbeddingRequest) -> tuple[Any, ...]:
        kind = "s" if isinstance(req.input[0], str) else "t"
        return (req.model, req.provider, kind, orjson.dumps(req.params, option=orjson.OPT_SORT_KEYS))

    async def submit(self, ctx: RequestContext, req: EmbeddingRequest, plan: "Plan") -> bool:
        """Join (or open) the batch of ``req``; True once ``ctx`` holds this request's share of the answer,
        False when the request is to be run on its own.  Raises the batch's error."""
        loop = asyncio.get_running_loop()
        key = self.key(req)
        b = self.open.get(key)
        if b is not None and b.count + len(req.input) > self.max_inputs:
            self._flush(b)
            b = None
        if b is None:
            b = self.open[key] = _Batch(key, plan)
            b.handle = loop.call_later(self.window, self._flush, b)
        mb = _Member(ctx, req, loop.create_future())
        b.members.append(mb)
        b.count += len(req.input)
        if b.count >= self.max_inputs:
            self._flush(b)
        try:
            out = await asyncio.shield(mb.fut)
        except asyncio.CancelledError:
            mb.gone = True
            if not b.flushed:
                b.count -= len(req.input)
            raise
        if out is ALONE:
            return False
        c, resp, cost, bctx = out
        ctx.provider = c.name
        ctx.upstream_model = c.model
        ctx.response = resp
        ctx.attempts += bctx.attempts
        ctx.retries += bctx.retries
        ctx.fallbacks += bctx.fallbacks
        ctx.candidates_tried.extend(bctx.candidates_tried)
        ctx.upstream_latency = bctx.upstream_latency
        ctx.state["coalesced"] = bctx.state.get("members", 1)
        ctx.response_headers["x-helixagent-coalesced"] = str(bctx.state.get("members", 1))
        if cost is not None:
            ctx.cost = cost
            ctx.response_headers["x-helixagent-cost"] = costs.format_cost(cost)
        return True

    def _flush(self, b: _Batch) -> None:
        if b.flushed:
            return
        b.flushed = True
        if b.handle is not None:
            b.handle.cancel()
        if self.open.get(b.key) is b:
            del self.open[b.key]
        members = [m for m in b.members if not m.gone]
        if not members:
            return
        if len(members) == 1:  # nobody to combine with: it runs as itself, at once
            members[0].fut.set_result(ALONE)
            return
        t = asyncio.ensure_future(self._run(b, members))
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    async def _run(self, b: _Batch, members: list[_Member]) -> None:
        router = self.router
        first = members[0].req
        inputs: list[Any] = [x for m in members for x in m.req.input]
        creq = EmbeddingRequest(first.model, inputs, first.params, first.provider)
        bctx = RequestContext("embeddings")
        bctx.identity = members[0].ctx.identity
        bctx.priority = PRIORITIES[min(RANK[m.ctx.priority or "normal"] for m in members)]
        bctx.state["members"] = len(members)
        try:
            from .mapping import _Mapped
            cands = router.order(b.plan, creq)
            c, res = await router._sequential(bctx, cands, creq, "embed", _Mapped(router, creq, "embed"))
            self.calls += 1
            self.members += len(members)
            for m, (resp, cost) in zip(members, self._split(c, res, members), strict=True):
                if not m.gone:
                    m.fut.set_result((c, resp, cost, bctx))
        except GatewayError as exc:
            alone = not exc.retryable and 400 <= exc.status < 500
            for m in members:
                if not m.gone and not m.fut.done():
                    m.fut.set_result(ALONE) if alone else m.fut.set_exception(exc.clone())
        except Exception:  # noqa: BLE001 - a gateway bug: logged, and every member answers a 500 (below)
            log.exception("combining %d embedding requests failed (a gateway bug)", len(members))
        finally:
            for m in members:  # a bug (or the drain cancelling this task): every member fails loudly
                if not m.gone and not m.fut.done():
                    m.fut.set_exception(GatewayError(500, "internal error while combining embedding requests",
                                                     type="server_error", code="internal_error", kind="internal"))

    def _split(self, c: Any, res: EmbeddingResponse, members: list[_Member]) -> list[tuple[EmbeddingResponse, Any]]:
        body = res.body
        data = body.get("data")
        n = sum(len(m.req.input) for m in members)
        if not isinstance(data, list) or len(data) != n or not all(isinstance(d, dict) for d in data):
            raise c.provider.bad_body("an embeddings answer with a different number of vectors than inputs")
        if any(d.get("index") != i for i, d in enumerate(data)):
            data = sorted(data, key=lambda d: d.get("index") if isinstance(d.get("index"), int) else 0)
        weights = [_weight(m.req) for m in members]  # (an estimate per text input: computed once)
        shares = split_tokens(res.usage.prompt_tokens, weights)
        totals = split_tokens(res.usage.total_tokens or res.usage.prompt_tokens, weights)
        out: list[tuple[EmbeddingResponse, Any]] = []
        off = 0
        head = {k: v for k, v in body.items() if k not in ("data", "usage")}
        for m, p, t in zip(members, shares, totals, strict=True):
            k = len(m.req.input)
            items = []
            for i, d in enumerate(data[off:off + k]):
                d = dict(d)
                d["index"] = i
                items.append(d)
            off += k
            u = Usage(p, 0, t)
            mb = dict(head, data=items, usage={"prompt_tokens": p, "total_tokens": t})
            cost = costs.usage_cost(c.provider.cfg, c.model, c.price, u) if c.price is not None else None
            out.append((EmbeddingResponse(mb, u, res.provider), cost))
        return out


def _weight(req: EmbeddingRequest) -> int:
    return sum(max(1, estimate_text(x)) if isinstance(x, str) else len(x) for x in req.input) or 1


def split_tokens(total: int, weights: list[int]) -> list[int]:
    """``total`` divided in proportion to ``weights`` (integers that add up to ``total``: largest remainder)."""
    w = sum(weights)
    if total <= 0 or w <= 0:
        return [0] * len(weights)
    exact = [total * x / w for x in weights]
    out = [int(e) for e in exact]
    left = total - sum(out)
    for i in sorted(range(len(weights)), key=lambda i: exact[i] - out[i], reverse=True)[:left]:
        out[i] += 1
    return out


