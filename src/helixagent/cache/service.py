"""The response cache stage, in-flight de-duplication and the streaming broadcast.

Flow of a chat request through :class:`CacheStage` (after auth and limits, just before the router):

1. ``pre``: decide whether the request may use the cache (``"cache": false``, ``Cache-Control``, the
   temperature policy), compute the key, look it up.  A hit short-circuits the pipeline with the stored
   answer (as JSON or replayed as an SSE stream).  On a miss, with ``cache.dedupe``, the request either
   *follows* an identical request already in flight (and short-circuits with its answer) or becomes the
   *leader* of a new flight.
2. the wrapped router handler (:meth:`CacheService.wrap`) runs the leader's upstream call; a non-streamed
   answer is handed to the followers and stored; a streamed answer is pumped by a :class:`Broadcast`
   task into a buffer that the leader and every follower read (late joiners replay the buffer, then
   follow live), and is stored once it completed with a finish_reason.
3. with a Redis (``cache.dedupe_across_instances``), the process's leader of a flight also takes the
   flight's lease in Redis or follows the leader of another instance (:mod:`.flights`): the answer, or
   the stream's chunks as they come, reach every instance from one upstream call.

The contract with the other stages: ``ctx.cache_status == "HIT"`` means the answer cost no upstream
tokens (``ctx.usage`` then holds the original answer's usage, for reporting only; limits must not
charge it).  ``"MISS"``: looked up, went upstream.  ``"BYPASS"``: not looked up.  ``None``: the cache
did not consider the request (embeddings, a request the router rejects).
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable

from ..canonical import ChatRequest, ChatResponse
from ..errors import GatewayError, bad_request
from ..gateway_types import GatewayLike
from ..pipeline import RequestContext, Stage
from .backends import BackendUnavailable, CacheStats, MemoryBackend, RedisBackend, Sealer
from .broadcast import Broadcast, BroadcastReader, Flight, Pending  # noqa: F401
from .flights import LeaderGone, Outcome, RemoteFlights, publish_stream
from .key import cache_key, scope_of, tenant_scope
from .values import _aiter, complete, decode, encode, parse_cache_control, replay  # noqa: F401

log = logging.getLogger("helixagent.cache")

HIT, MISS, BYPASS = "HIT", "MISS", "BYPASS"
HEADER = "x-helixagent-cache"
_STATE = "_cache"          # ctx.state key of a leader's pending entry
_MAX_FOLLOW = 3            # a follower whose leader vanished retries this often, then goes alone


# -- the service ----------------------------------------------------------------------------------------

class CacheService:
    """``gw.services["cache"]``: the backend, the in-flight table and the counters."""

    def __init__(self, cfg: Any, router: Any, keyring: Any = None, shared_redis_url: str | None = None):
        self.cfg = cfg
        self.router = router
        self.stats = CacheStats()
        self.ttl = float(cfg.ttl)
        self.scope = cfg.scope
        self.nonzero = cfg.cache_nonzero_temperature
        self.dedupe = cfg.dedupe
        self.enabled = True  # cache.enabled set to false by a reload: every request bypasses
        self.flags: Any = None  # the feature flags (flags.py): ``caching`` off bypasses, ``multi_tenant`` scopes
        if cfg.type == "redis":
            self.backend: Any = RedisBackend(cfg.redis_url, cfg.key_prefix, cfg.redis_timeout, self.stats,
                                             pool_size=cfg.redis_pool_size, pool_timeout=cfg.redis_pool_timeout,
                                             sealer=Sealer(keyring) if keyring is not None else None)
        else:
            self.backend = MemoryBackend(cfg.max_size, cfg.max_bytes, self.stats)
        self.inflight: dict[str, Flight] = {}
        self.pumps: set[Broadcast] = set()
        # across instances (cache/flights.py): with a Redis (the cache's, else redis.url) and dedupe
        self.remote: RemoteFlights | None = None
        url = cfg.redis_url if cfg.type == "redis" else shared_redis_url
        if self.dedupe and cfg.dedupe_across_instances and url:
            # the Redis cache's own backend (one client, one outage state); a memory cache: redis.url
            own = cfg.type != "redis"
            rb = RedisBackend(url, cfg.key_prefix, cfg.redis_timeout, self.stats, pool_size=cfg.redis_pool_size,
                              pool_timeout=cfg.redis_pool_timeout) if own else self.backend
            self.remote = RemoteFlights(rb, float(cfg.flight_lease), float(getattr(router, "budget", 120.0)),
                                        self.backend, owns_backend=own)

    def reconfigure(self, cfg: Any) -> None:
        """A config reload: ttl, enabled, scope, dedupe and the temperature policy apply at once; the
        backend (type, size, Redis settings) and its entries are kept (reload.py reports those settings
        as needing a restart)."""
        self.ttl = float(cfg.ttl)
        self.scope = cfg.scope
        self.nonzero = cfg.cache_nonzero_temperature
        self.dedupe = cfg.dedupe
        self.enabled = cfg.enabled
        self.cfg = cfg
        if self.remote is not None:  # the router was reconfigured first (reload.py): its time budget is new
            self.remote.budget = float(getattr(self.router, "budget", self.remote.budget))

    # counters (the observability module exports these)
    @property
    def hits(self) -> int:
        return self.stats.hits

    @property
    def misses(self) -> int:
        return self.stats.misses

    @property
    def evictions(self) -> int:
        return self.stats.evictions

    @property
    def errors(self) -> int:
        return self.stats.errors

    def snapshot(self) -> dict[str, int]:
        d = self.stats.as_dict()
        d["inflight"] = len(self.inflight)
        r = self.remote
        if r is not None:
            d["flights_led"], d["flights_followed"], d["flights_taken_over"] = r.led, r.followed, r.takeovers
        return d

    async def start(self) -> None:
        await self.backend.start()
        if self.remote is not None:
            await self.remote.start()

    async def close(self) -> None:
        for bc in list(self.pumps):
            if bc.task is not None:
                bc.task.cancel()
        if self.remote is not None:
            await self.remote.close()
        await self.backend.close()

    def finish_lease(self, p: Pending, kind: bytes, data: bytes = b"") -> None:
        """Publish the leader's outcome to the followers on other instances and give the lease up."""
        lease = p.lease
        if lease is not None and self.remote is not None:
            p.lease = None
            self.remote.spawn(lease.finish(kind, data))

    # -- backend access (never raises) ---------------------------------------------------------------
    async def store(self, key: str, payload: bytes) -> None:
        b = self.backend
        try:
            ok = b.set_now(key, payload, self.ttl) if b.sync else await b.set(key, payload, self.ttl)
        except BackendUnavailable:
            return
        if ok:
            self.stats.stores += 1

    # -- flights ---------------------------------------------------------------------------------
    def land(self, p: Pending) -> None:
        if p.lease is not None:
            self.finish_lease(p, b"x")  # no answer was published: the followers start over
        fl = p.flight
        if fl is not None:
            fl.resolve("retry", None)  # no-op when already resolved
            if self.inflight.get(fl.key) is fl:
                del self.inflight[fl.key]
            p.flight = None

    def settle(self, p: Pending, kind: str, value: Any) -> None:
        if kind == "error" and p.lease is not None:
            from .flights import error_to_bytes
            self.finish_lease(p, b"e", error_to_bytes(value))
        if p.flight is not None:
            p.flight.resolve(kind, value)
        self.land(p)

    def serve(self, ctx: RequestContext, resp: ChatResponse, model: str) -> None:
        """Answer ``ctx`` from a stored or shared answer (no upstream tokens)."""
        ctx.provider = resp.provider
        ctx.upstream_model = model
        ctx.usage = resp.usage
        req: ChatRequest = ctx.request
        if req.stream:
            ctx.stream = _aiter(replay(resp, req.include_usage))
            ctx.streamed = True
        else:
            ctx.response = resp
        ctx.cache_status = HIT
        ctx.response_headers[HEADER] = HIT
        self.stats.hits += 1

    def serve_raw(self, ctx: RequestContext, raw: bytes, flight: Flight | None) -> bool:
        """Answer from a stored value; a claimed flight hands the same value to its followers."""
        try:
            resp, model = decode(raw)
        except Exception:  # noqa: BLE001 - a foreign or corrupt value: count it, go upstream
            self.stats.errors += 1
            return False
        if flight is not None:
            flight.resolve("resp", raw)
            if self.inflight.get(flight.key) is flight:
                del self.inflight[flight.key]
        self.serve(ctx, resp, model)
        return True

    async def follow(self, ctx: RequestContext, fl: Flight) -> bool:
        """Wait for an identical in-flight request.  True: ctx answered; False: start over."""
        kind, val = await asyncio.shield(fl.future)
        if kind == "retry":
            return False
        if kind == "error":
            self._follower_failed(ctx)
            raise val.clone()
        if kind == "resp":
            resp, model = decode(val)
            self.serve(ctx, resp, model)
            self.stats.coalesced += 1
            return True
        bc: Broadcast = val
        if bc.abandoned:
            return False
        req: ChatRequest = ctx.request
        if req.stream:
            self._follow_stream(ctx, bc)
            return True
        bc.hold()
        try:
            await bc.wait_done()
        finally:
            bc.release()
        if bc.abandoned or isinstance(bc.error, LeaderGone):
            return False  # nothing was sent to this client yet: start over
        if bc.error is not None or bc.payload is None:
            self._follower_failed(ctx)
            raise (bc.error or GatewayError(502, "the upstream stream ended without an answer",
                                            provider=bc.provider, kind="stream_error")).clone()
        resp, model = decode(bc.payload)
        self.serve(ctx, resp, model)
        self.stats.coalesced += 1
        return True

    def answer_remote(self, ctx: RequestContext, got: Outcome, p: Pending) -> bool:
        """Answer ``ctx`` (and this process's followers of ``p.flight``) with what a leader on another
        instance produced (cache/flights.py).  Raises the leader's error."""
        if got.kind == "hit" or got.kind == "resp":
            assert got.raw is not None
            if self.serve_raw(ctx, got.raw, p.flight):
                if got.kind == "resp":
                    self.stats.coalesced += 1
                return True
            self.settle(p, "retry", None)
            raise GatewayError(502, "an answer shared by another instance could not be decoded",
                               kind="stream_error")
        if got.kind == "error":
            assert got.error is not None
            self.settle(p, "error", got.error)
            self._follower_failed(ctx)
            raise got.error.clone()
        assert got.chunks is not None
        bc = Broadcast(self, p, got.chunks, got.provider, got.model)  # p.store False: the leader stores
        if p.flight is not None:
            p.flight.resolve("stream", bc)
        bc.start()
        self._follow_stream(ctx, bc)
        return True

    def _follow_stream(self, ctx: RequestContext, bc: Broadcast) -> None:
        """``ctx`` answers with the shared stream of ``bc`` (a follower: no upstream tokens of its own)."""
        ctx.stream = bc.reader()
        ctx.streamed = True
        ctx.provider = bc.provider
        ctx.upstream_model = bc.model
        ctx.cache_status = HIT
        ctx.response_headers[HEADER] = HIT
        self.stats.hits += 1
        self.stats.coalesced += 1

    def _follower_failed(self, ctx: RequestContext) -> None:
        ctx.cache_status = MISS
        ctx.response_headers[HEADER] = MISS
        self.stats.misses += 1

    def bypass(self, ctx: RequestContext) -> bool:
        ctx.cache_status = BYPASS
        ctx.response_headers[HEADER] = BYPASS
        self.stats.bypasses += 1
        return False

    # -- the leader's upstream call ----------------------------------------------------------------
    def wrap(self, inner: Callable[[RequestContext], Any]) -> Callable[[RequestContext], Any]:
        """Wrap the router's chat handler: share the leader's outcome with its followers, store it."""

        async def handle(ctx: RequestContext) -> None:
            p: Pending | None = ctx.state.get(_STATE)
            if p is None:
                await inner(ctx)
                return
            try:
                await inner(ctx)
            except GatewayError as exc:
                self.settle(p, "error", exc)
                raise
            except asyncio.CancelledError:
                self.settle(p, "retry", None)
                raise
            except Exception as exc:
                self.settle(p, "error", GatewayError(500, f"internal error: {type(exc).__name__}",
                                                     kind="internal"))
                raise
            if ctx.stream is not None:
                bc = Broadcast(self, p, ctx.stream, ctx.provider, ctx.upstream_model)
                ctx.stream = bc.reader()
                if p.flight is not None:
                    p.flight.resolve("stream", bc)  # stays in flight (late joiners) until the pump lands
                bc.start()
                lease, p.lease = p.lease, None
                if lease is not None and self.remote is not None:
                    # a reader of its own, taken now (before any client can leave): followers elsewhere
                    self.remote.spawn(publish_stream(bc, lease, bc.reader()))
                return
            resp = ctx.response
            if resp is None:
                self.settle(p, "retry", None)
                return
            want_store = (p.store and ctx.provider == p.provider and ctx.upstream_model == p.model
                          and complete(resp))
            if p.flight is None and not want_store:
                return
            payload = encode(resp, ctx.provider, ctx.upstream_model)
            if p.flight is not None:
                p.flight.resolve("resp", payload)
            if want_store:
                await self.store(p.key, payload)
            self.finish_lease(p, b"r", payload)  # after the store: a late request finds the entry
            self.land(p)

        return handle


class CacheStage(Stage):
    name = "cache"

    def __init__(self, svc: CacheService):
        self.svc = svc

    async def pre(self, ctx: RequestContext) -> bool:
        req = ctx.request
        if type(req) is not ChatRequest:   # embeddings: not cached
            return False
        svc = self.svc
        flags = svc.flags
        if not svc.enabled or (flags is not None and not flags.caching.on(ctx.identity)):
            return svc.bypass(ctx)  # cache.enabled: false (reloaded), or the caching flag is off
        helix = ctx.state.get("helix")
        flag = helix.get("cache") if helix else None
        if flag is not None and type(flag) is not bool:
            raise bad_request("'cache' must be a boolean: false skips the cache for this request, true "
                              "caches it even with a non-zero temperature", param="cache", code="invalid_type")
        if flag is False:
            return svc.bypass(ctx)
        if flag is None and not svc.nonzero and req.params.get("temperature") != 0:
            return svc.bypass(ctx)  # sampled answers differ run to run: not cached by default
        cc = ctx.headers.get("cache-control")
        no_cache, no_store = parse_cache_control(cc) if cc else (False, False)
        try:
            cand = svc.router.candidates(req.model, req.provider)[0]
            provider, model = cand.provider.name, cand.model
            mt = flags is not None and flags.multi_tenant.on(ctx.identity)
            key = cache_key(req, tenant_scope(ctx.identity) if mt else scope_of(ctx.identity, svc.scope),
                            provider, model)
        except (GatewayError, IndexError):
            return False  # the router answers with the proper error
        except (TypeError, ValueError):
            return svc.bypass(ctx)  # not canonicalisable (e.g. an integer beyond 64 bits)
        status = BYPASS if no_cache else MISS
        store = not no_store
        backend = svc.backend
        if not no_cache and backend.sync:
            # memory: looked up before the in-flight table (no await, so no race with a landing leader)
            raw = backend.get_now(key)
            if raw is not None and svc.serve_raw(ctx, raw, None):
                return True
        flight = None
        if svc.dedupe:
            inflight = svc.inflight
            tries = 0
            while True:
                fl = inflight.get(key)
                if fl is None:
                    # claim the key *before* an awaited (Redis) lookup: identical requests arriving
                    # meanwhile join this flight instead of racing the store of a leader that is landing
                    flight = inflight[key] = Flight(key, asyncio.get_running_loop())
                    break
                if no_cache or tries >= _MAX_FOLLOW:
                    break  # a refresh, or a leader that keeps vanishing: go upstream alone
                tries += 1
                if await svc.follow(ctx, fl):
                    return True
        if not no_cache and not backend.sync:
            try:
                raw = await backend.get(key)
            except BackendUnavailable:
                raw = None
                status = BYPASS
                store = False
            except BaseException:  # cancelled while claiming the key: release the followers
                if flight is not None:
                    svc.settle(Pending(key, False, flight, provider, model), "retry", None)
                raise
            if raw is not None and svc.serve_raw(ctx, raw, flight):
                return True
        lease = None
        if svc.remote is not None and flight is not None and (status == MISS or no_cache):
            try:
                got = await svc.remote.join(key, req.stream, not no_cache)
            except BaseException:  # cancelled while waiting: release this process's followers
                svc.settle(Pending(key, False, flight, provider, model), "retry", None)
                raise
            if got.kind == "lead":
                lease = got.lease
            elif got.kind != "alone":
                return svc.answer_remote(ctx, got, Pending(key, False, flight, provider, model))
        ctx.state[_STATE] = Pending(key, store, flight, provider, model, lease)
        ctx.cache_status = status
        ctx.response_headers[HEADER] = status
        if status == MISS:
            svc.stats.misses += 1
        else:
            svc.stats.bypasses += 1
        return False

    async def post(self, ctx: RequestContext) -> None:
        p: Pending | None = ctx.state.get(_STATE)
        if p is not None and p.flight is not None and not p.flight.future.done():
            # the upstream call never ran (a later stage answered or rejected): release the followers
            if ctx.error is not None:
                self.svc.settle(p, "error", ctx.error)
            else:
                self.svc.settle(p, "retry", None)


def _keyring(cfg: Any) -> Any:
    """The records' keyring when ``encryption.enabled`` (the Redis cache is stored encrypted with it)."""
    from ..config import ConfigError
    from ..store.crypto import KeyError_, Keyring
    try:
        return Keyring.from_config(cfg.encryption)
    except KeyError_ as exc:
        raise ConfigError(str(exc)) from None


def install(gw: GatewayLike) -> None:
    cfg = gw.cfg.cache
    if not cfg.enabled:
        return
    svc = CacheService(cfg, gw.router, _keyring(gw.cfg), shared_redis_url=gw.cfg.redis.url)
    svc.flags = gw.services.get("flags")
    gw.services["cache"] = svc
    gw.add_stage(CacheStage(svc))
    gw.chat_pipeline.handler = svc.wrap(gw.chat_pipeline.handler)
    gw.on_startup(svc.start)
    gw.on_shutdown(svc.close)
