"""Provider concurrency caps as priority queues with weighted fair share (docs/routing.md, "Queues and
priorities").

A provider gets a :class:`ProviderQueue` when it has a cap: ``providers[].max_concurrency``, the global
``http.max_conns_per_host`` (the lower of the two), or a per-model cap in ``providers[].models_concurrency``.
A request takes a slot before its upstream call and gives it back when the answer is read (a stream: when
it ends).  With no slot free it waits, up to ``queue_timeout_ms`` (the provider's, else
``routing.queue.timeout_ms``) and at most the request's remaining budget; then the router moves on to the
next candidate as it does for a busy (overloaded) provider, and when none is left the client gets a 503
with Retry-After.  Waiting is never a verdict on the provider's health.

Order of service: strict priority (``high`` before ``normal`` before ``low``); within a priority, self-clocked
fair queueing (SCFQ) between flows (keys, users or applications: ``routing.queue.fair_share``): a request's tag is
``max(V, last tag of its flow) + 1/weight``, the queue serves the smallest tag, and ``V`` is the tag last
served.  Two flooding keys of equal weight alternate, a key of weight 2 gets twice the slots of a key of
weight 1, and a newcomer's first request is tagged ``V + 1/w``: it goes ahead of a flood's backlog.  Every
operation is O(log n) (a heap per capped model plus one for the provider's other models; a cancelled waiter
is a tombstone skipped when it reaches the top, and the heaps are rebuilt when tombstones outnumber the
live waiters).

A waiter whose task is cancelled (the client left, a hedge lost, the drain ended) leaves the queue at once;
a slot granted to it in the same instant is handed on.  Counts are per gateway process, like
``http.max_conns_per_host``.
"""
from __future__ import annotations

import asyncio
import heapq
import itertools
import time
import weakref
from typing import Any, AsyncIterator, Callable

from ..config import Config, ProviderConfig
from ..errors import GatewayError
from ..pipeline import PRIORITIES, RequestContext
from .priority import RANK, flow_of

WAITING, GRANTED, EXPIRED, GONE = 0, 1, 2, 3
_ANY = ""  # the heap of the models without a cap of their own
_EWMA = 0.2

# observer(provider, priority, waited seconds, outcome): outcome "served", "timeout" or "full".  A request that
# found a slot free (waited 0 s: the common case) is not reported one by one: it is counted in the queue's
# ``instant`` list (per priority rank, only ever incremented), which the metrics read when they flush.
Observer = Callable[[str, str, float, str], None]


class _Waiter:
    __slots__ = ("rank", "tag", "seq", "model", "fut", "state", "counted")

    def __init__(self, rank: int, tag: float, seq: int, model: str, fut: asyncio.Future[None]):
        self.rank = rank
        self.tag = tag
        self.seq = seq
        self.model = model
        self.fut = fut
        self.state = WAITING
        self.counted: str | None = None  # the capped model whose count its grant took

    def __lt__(self, other: "_Waiter") -> bool:
        return (self.rank, self.tag, self.seq) < (other.rank, other.tag, other.seq)


class Lease:
    """One slot of a provider (and of its model, when capped); :meth:`release` is idempotent."""

    __slots__ = ("queue", "model", "t0", "done", "__weakref__")

    def __init__(self, queue: "ProviderQueue", model: str | None):
        self.queue = queue
        self.model = model  # the capped model whose count it holds (None: the provider's count only)
        self.t0 = time.monotonic()
        self.done = False

    def release(self) -> None:
        if not self.done:
            self.done = True
            self.queue._release(self.model, time.monotonic() - self.t0)


class ProviderQueue:
    def __init__(self, name: str, cap: int | None, model_caps: dict[str, int], timeout: float, max_waiting: int,
                 fair_share: str):
        self.name = name
        self.cap = cap  # None: only the models' own caps
        self.model_caps = dict(model_caps)
        self.timeout = timeout
        self.max_waiting = max_waiting
        self.fair_share = fair_share
        self.active = 0
        self.model_active: dict[str, int] = {m: 0 for m in model_caps}
        self.heaps: dict[str, list[_Waiter]] = {_ANY: []}
        for m in model_caps:
            self.heaps[m] = []
        self.vtime = [0.0] * len(PRIORITIES)
        self.flows: dict[tuple[int, str], float] = {}
        self.depth = [0] * len(PRIORITIES)
        self.waiting = 0
        self.tombstones = 0
        self.hold = 1.0  # EWMA of how long a slot is held (seconds): the Retry-After estimate
        self.served = 0
        self.timeouts = 0
        self.rejected = 0
        self._seq = itertools.count()
        self.observer: Observer | None = None
        # slots granted at once (no wait), per priority rank; only ever incremented (shared by the queues of
        # one provider name across reloads: Queues.instant)
        self.instant = [0] * len(PRIORITIES)

    # -- state -------------------------------------------------------------------------------------
    def _free(self, model: str) -> bool:
        if self.cap is not None and self.active >= self.cap:
            return False
        mc = self.model_caps.get(model)
        return mc is None or self.model_active[model] < mc

    def _take(self, model: str) -> str | None:
        self.active += 1
        if model in self.model_active:
            self.model_active[model] += 1
            return model
        return None

    def _release(self, model: str | None, held: float | None) -> None:
        self.active -= 1
        if model is not None and model in self.model_active:  # a reload may have lifted the model's cap
            self.model_active[model] = max(0, self.model_active[model] - 1)
        if held is not None:
            self.hold += _EWMA * (held - self.hold)
        if self.waiting:
            self._pump()

    def _pump(self) -> None:
        """Grant free slots to the best eligible waiters (every state change ends here)."""
        while self.waiting and (self.cap is None or self.active < self.cap):
            best: _Waiter | None = None
            for key, heap in self.heaps.items():
                while heap and heap[0].state != WAITING:
                    heapq.heappop(heap)
                    self.tombstones -= 1
                if not heap:
                    continue
                if key != _ANY and self.model_active[key] >= self.model_caps[key]:
                    continue
                if best is None or heap[0] < best:
                    best = heap[0]
            if best is None:
                return
            heapq.heappop(self.heaps[best.model if best.model in self.model_caps else _ANY])
            if best.fut.done():  # its task was cancelled a moment ago and has not run yet: it is gone
                self._leave(best, GONE)
                continue
            self._leave(best, GRANTED)
            self.vtime[best.rank] = best.tag
            best.counted = self._take(best.model)
            best.fut.set_result(None)

    def update(self, cap: int | None, model_caps: dict[str, int], timeout: float, max_waiting: int,
               fair_share: str) -> None:
        """A config reload: the new caps and settings, in place (waiters keep their place and tags; a slot
        held under a cap that is gone is simply given back).  A model whose cap is lifted has its waiters
        moved to the provider's common heap; a larger cap grants waiters at once."""
        self.cap = cap
        self.timeout = timeout
        self.max_waiting = max_waiting
        self.fair_share = fair_share
        for m in [m for m in self.model_caps if m not in model_caps]:
            moved = [w for w in self.heaps.pop(m) if w.state == WAITING]
            common = self.heaps[_ANY]
            common.extend(moved)
            heapq.heapify(common)
            del self.model_active[m]
        for m in model_caps:
            if m not in self.model_caps:
                self.heaps[m] = []
                self.model_active[m] = 0  # slots taken before the cap existed are not counted against it
        self.model_caps = dict(model_caps)
        self.tombstones = sum(1 for h in self.heaps.values() for w in h if w.state != WAITING)
        self._pump()

    def _leave(self, w: _Waiter, state: int) -> None:
        w.state = state
        self.waiting -= 1
        self.depth[w.rank] -= 1

    def _bury(self, w: _Waiter, state: int) -> None:
        """A waiter leaves without a slot (timed out, cancelled): a tombstone in its heap."""
        self._leave(w, state)
        self.tombstones += 1
        if self.tombstones > 64 and self.tombstones > self.waiting:
            for key, heap in self.heaps.items():
                live = [x for x in heap if x.state == WAITING]
                heapq.heapify(live)
                self.heaps[key] = live
            self.tombstones = 0
        self._pump()  # the waiter may have been the head of a heap blocked by nothing else

    def _tag(self, rank: int, flow: str, weight: float) -> float:
        key = (rank, flow)
        v = self.vtime[rank]
        last = self.flows.get(key, v)
        tag = (last if last > v else v) + 1.0 / weight
        self.flows[key] = tag
        if len(self.flows) > 4096 and len(self.flows) > 2 * self.waiting:
            vt = self.vtime
            self.flows = {k: t for k, t in self.flows.items() if t > vt[k[0]]}
        return tag

    # -- the request side --------------------------------------------------------------------------
    async def acquire(self, ctx: RequestContext, model: str, budget: float) -> Lease:
        """A slot for ``model``, waiting at most min(queue timeout, ``budget``) seconds.  Raises the 503
        (``queue_timeout`` / ``queue_full``, retryable: the router tries the next candidate) or, when the
        request's own budget is what ran out, the 504 ``budget`` error of the caller."""
        prio = ctx.priority or "normal"
        # A free slot is this request's at once: every change of state ends in _pump, which grants free slots
        # to eligible waiters, so whoever still waits is held by a full model cap that does not apply here.
        cap = self.cap
        if not self.model_caps and (cap is None or self.active < cap):  # _free and _take, inline: the common case
            self.active += 1
            self.served += 1
            self.instant[RANK[prio]] += 1
            return Lease(self, None)
        if self._free(model):
            counted = self._take(model)
            self.served += 1
            self.instant[RANK[prio]] += 1  # a wait of 0 s, observed by the metrics at their flush
            return Lease(self, counted)
        rank = RANK[prio]
        if self.waiting >= self.max_waiting or self.timeout <= 0:
            self.rejected += 1
            self._observe(prio, 0.0, "full")
            raise self._busy(prio, "queue_full", f"{self.waiting} requests are already waiting"
                             if self.timeout > 0 else "queue_timeout_ms is 0")
        flow, weight = flow_of(ctx, self.fair_share)
        loop = asyncio.get_running_loop()
        w = _Waiter(rank, self._tag(rank, flow, weight), next(self._seq), model, loop.create_future())
        heapq.heappush(self.heaps[model if model in self.model_caps else _ANY], w)
        self.waiting += 1
        self.depth[rank] += 1
        self._pump()  # waiters for another (full) model may be all that is ahead: then this one goes now
        limit = min(self.timeout, budget)
        t0 = time.monotonic()
        handle = loop.call_later(max(0.0, limit), self._expire, w)
        try:
            await w.fut
        except asyncio.CancelledError:
            if w.state == GRANTED:  # granted in the same instant: hand the slot on
                self._release(w.counted, None)
            elif w.state == WAITING:
                self._bury(w, GONE)
            raise
        finally:
            handle.cancel()
        waited = time.monotonic() - t0
        if w.state == EXPIRED:
            self.timeouts += 1
            self._observe(prio, waited, "timeout")
            if limit < self.timeout:
                raise BudgetSpent()
            raise self._busy(prio, "queue_timeout", f"no slot was free within {self.timeout * 1000:.0f} ms")
        self.served += 1
        self._observe(prio, waited, "served")
        ctx.state["queue_wait"] = ctx.state.get("queue_wait", 0.0) + waited
        return Lease(self, w.counted)

    def _expire(self, w: _Waiter) -> None:
        if w.state == WAITING:
            self._bury(w, EXPIRED)
            if not w.fut.done():
                w.fut.set_result(None)

    def _observe(self, prio: str, waited: float, outcome: str) -> None:
        obs = self.observer
        if obs is not None:
            obs(self.name, prio, waited, outcome)

    def retry_after(self) -> float:
        """Seconds until a slot is likely free for a new request: the backlog over the slots, at the
        recent hold time (1 s at least, 60 s at most)."""
        slots = self.cap or max(1, sum(self.model_caps.values()))
        return max(1.0, min(60.0, self.hold * (self.waiting + 1) / slots))

    def _busy(self, prio: str, code: str, why: str) -> GatewayError:
        return GatewayError(503, f"provider {self.name!r} is at its concurrency limit and {why} (priority "
                            f"{prio}); retry later", type="service_unavailable", code=code, provider=self.name,
                            retryable=True, retry_after=self.retry_after(), kind=code)

    def snapshot(self) -> dict[str, Any]:
        return {"provider": self.name, "capacity": self.cap, "in_use": self.active,
                "models": {m: {"capacity": c, "in_use": self.model_active[m]} for m, c in self.model_caps.items()},
                "waiting": dict(zip(PRIORITIES, self.depth, strict=True)), "served": self.served,
                "timeouts": self.timeouts, "rejected": self.rejected, "hold_seconds": round(self.hold, 4)}


class BudgetSpent(Exception):
    """The request's own time budget ran out while it waited (the router answers its 504)."""


class Queues:
    """Every capped provider's queue, by provider name."""

    def __init__(self, cfg: Config):
        self.by_name: dict[str, ProviderQueue] = {}
        self.observer: Observer | None = None
        # provider name -> its queues' count of slots granted at once, per priority rank (ProviderQueue.instant):
        # kept here, across reloads, so that what a queue dropped by a reload counted is still read
        self.instant: dict[str, list[int]] = {}
        q = cfg.routing.queue
        per_host = cfg.http.max_conns_per_host or None
        for pc in cfg.providers:
            cap = _cap(pc, per_host)
            if cap is None and not pc.models_concurrency:
                continue
            timeout = (pc.queue_timeout_ms if pc.queue_timeout_ms is not None else q.timeout_ms) / 1000.0
            pq = self.by_name[pc.name] = ProviderQueue(pc.name, cap, pc.models_concurrency, timeout, q.max_waiting,
                                                       q.fair_share)
            self.instant[pc.name] = pq.instant

    def reconfigure(self, cfg: Config) -> None:
        """A config reload: a provider that keeps a cap keeps its queue (updated in place); one that loses
        it, or is gone, stops taking new requests (its waiters and slots finish in the old queue)."""
        fresh = Queues(cfg)
        for name, q in fresh.by_name.items():
            old = self.by_name.get(name)
            if old is not None:
                old.update(q.cap, q.model_caps, q.timeout, q.max_waiting, q.fair_share)
                fresh.by_name[name] = old
            else:
                q.observer = self.observer
                q.instant = self.instant.setdefault(name, q.instant)
        self.by_name = fresh.by_name

    def get(self, name: str) -> ProviderQueue | None:
        return self.by_name.get(name)

    def set_observer(self, fn: Observer | None) -> None:
        self.observer = fn
        for pq in self.by_name.values():
            pq.observer = fn

    def snapshot(self) -> list[dict[str, Any]]:
        return [pq.snapshot() for pq in self.by_name.values()]


def _cap(pc: ProviderConfig, per_host: int | None) -> int | None:
    caps = [c for c in (pc.max_concurrency, per_host) if c]
    return min(caps) if caps else None


# -- holding a slot for the length of a stream ------------------------------------------------------------
class LeasedStream:
    """An upstream stream that holds its provider slot until it ends, fails or is closed (or, should
    nobody ever iterate or close it, until it is garbage: the slot is handed back then too)."""

    __slots__ = ("_it", "_lease", "__weakref__")

    def __init__(self, it: AsyncIterator[Any], lease: Lease):
        self._it = it
        self._lease = lease
        weakref.finalize(self, _release_soon, lease)

    def __aiter__(self) -> "LeasedStream":
        return self

    async def __anext__(self) -> Any:
        try:
            return await self._it.__anext__()
        except BaseException:
            self._lease.release()
            raise

    async def aclose(self) -> None:
        self._lease.release()
        closer = getattr(self._it, "aclose", None)
        if closer is not None:
            await closer()


def _release_soon(lease: Lease) -> None:
    if lease.done:
        return
    try:
        asyncio.get_running_loop().call_soon(lease.release)
    except RuntimeError:  # no running loop (the gateway is gone): nothing waits for the slot any more
        lease.done = True


async def queued_attempt(router: Any, ctx: RequestContext, c: Any, sub: Any, op: str, deadline: float, probe: int,
                         wire: Any, sprobe: int) -> Any:
    """Hedged mode (hedge.py): wait for ``c``'s slot, then make the attempt; the slot is held as in
    sequential mode (a stream keeps it until it ends).  A wait that ends without a slot frees the breaker
    probes taken for the attempt: no verdict on the provider."""
    h = c.health
    try:
        lease = await c.queue.acquire(ctx, c.model, deadline - router.clock())
    except (GatewayError, BudgetSpent, asyncio.CancelledError) as exc:
        if op == "stream":
            h.stream.cancelled(sprobe)
        h.cancelled(probe)
        if isinstance(exc, BudgetSpent):
            raise router._budget_error() from None
        raise
    kept = False
    try:
        res = await router._attempt(c, sub, op, deadline - router.clock(), probe, wire, sprobe)
        if op == "stream":
            res = (res[0], LeasedStream(res[1], lease), res[2])
            kept = True
        return res
    finally:
        if not kept:
            lease.release()
