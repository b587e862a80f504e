"""The :class:`Authenticator`: a presented key (the master key or a virtual ``hx-...`` key) to an
:class:`~helixagent.pipeline.Identity` through an in-process cache of the key store, and the role check
(:data:`PERMISSIONS`).  The fresh 401/503 errors it raises are built here too."""
from __future__ import annotations

import asyncio
import hmac
import logging
import time
from typing import Any

from ..errors import GatewayError
from ..pipeline import ANONYMOUS_LOCAL, Identity
from ..store.db import DB_UNAVAILABLE
from .keys import KEY_PREFIX, KeyRecord, KeyStore, hash_key

log = logging.getLogger("helixagent.auth")

# action -> roles allowed
PERMISSIONS: dict[str, frozenset[str]] = {
    "completions": frozenset({"admin", "user"}),
    "embeddings": frozenset({"admin", "user"}),
    "models": frozenset({"admin", "user", "readonly"}),
    "health": frozenset({"admin", "user", "readonly"}),
    "usage": frozenset({"admin", "user", "readonly"}),
    "admin": frozenset({"admin"}),
    "metrics": frozenset({"admin"}),
}

MASTER = Identity(key_id="master", user_id=None, application=None, role="admin", is_master=True)
FALLBACK_TTL = 1.0        # seconds a cached key is trusted when no key-change subscription is live
NEGATIVE_TTL = 5.0        # seconds an unknown hx- key is remembered as unknown (bounded dict)
NEGATIVE_MAX = 10000


def _unauthorized(message: str, code: str) -> GatewayError:
    return GatewayError(401, message, type="authentication_error", code=code)


# Errors are built fresh for every raise, never shared: re-raising one stored exception instance makes
# Python chain each raise's traceback onto the last one, so every rejected request's frames (and its
# body) stay reachable for ever (issue 12: 100k wrong-key requests grew a worker by ~500 MB).
def invalid_key() -> GatewayError:
    return _unauthorized("invalid API key", "invalid_api_key")


def revoked_key() -> GatewayError:
    return _unauthorized("this API key has been revoked", "revoked_api_key")


def store_unavailable() -> GatewayError:
    return GatewayError(503, "the API key store is unavailable; try again shortly", code="auth_unavailable",
                        retry_after=1)


# what a key lookup shared by concurrent requests answers when the store failed (each waiter raises its
# own store_unavailable(), not one exception set on the shared future)
_STORE_DOWN: Any = object()


class _Entry:
    __slots__ = ("identity", "not_after", "revoked", "fetched", "record")

    def __init__(self, rec: KeyRecord, fetched: float):
        self.record = rec
        self.identity = Identity(key_id=rec.id, user_id=rec.user_id, application=rec.application, role=rec.role,
                                 limits=rec.limits)
        self.not_after = rec.not_after
        self.fetched = fetched
        self.revoked = rec.revoked_at is not None


class Authenticator:
    def __init__(self, master_key: str | None, store: KeyStore | None = None, ttl: float = 60.0,
                 clock: Any = time.monotonic, wall: Any = time.time):
        self.master_key = master_key.encode() if master_key else None
        self.store = store
        self.ttl = ttl
        self.bus: Any = None
        self.clock = clock
        self.wall = wall
        self._cache: dict[str, _Entry] = {}
        self._negative: dict[str, float] = {}
        self._inflight: dict[str, asyncio.Future[Any]] = {}
        self.db_lookups = 0
        self._db_outage = False

    @property
    def open(self) -> bool:
        """No master key: local-only mode; callers without a virtual key are the local admin."""
        return self.master_key is None

    @property
    def current_ttl(self) -> float:
        bus = self.bus
        return self.ttl if bus is not None and bus.healthy else min(self.ttl, FALLBACK_TTL)

    # -- cache maintenance ----------------------------------------------------------------------------
    def forget(self, ids: list[str] | None) -> None:
        """Drop cached keys (by id; all when ``ids`` is None) and every negative entry."""
        self._negative.clear()
        if ids is None:
            self._cache.clear()
            return
        wanted = set(ids)
        for h in [h for h, e in self._cache.items() if e.record.id in wanted]:
            del self._cache[h]

    async def changed(self, ids: list[str]) -> None:
        """A key was created, rotated or revoked here: forget it locally and tell the other instances."""
        self.forget(ids)
        if self.bus is not None and self.bus.healthy:
            try:
                await self.bus.publish(ids)
            except Exception as exc:  # noqa: BLE001 - best-effort notice, logged; the cache TTL bounds it
                log.error("could not publish key change %s to Redis (%s); other instances stop using their "
                          "cached copy within %.0fs", ",".join(ids), type(exc).__name__, self.ttl)

    # -- identification -------------------------------------------------------------------------------
    async def identify(self, token: str | None) -> Identity:
        if not token:
            if self.master_key is None:
                return ANONYMOUS_LOCAL
            raise _unauthorized("missing API key: send 'Authorization: Bearer <key>' or 'x-api-key: <key>'",
                                "missing_api_key")
        mk = self.master_key
        if mk is not None and hmac.compare_digest(token.encode("utf-8", "surrogatepass"), mk):
            return MASTER
        if self.store is None or not token.startswith(KEY_PREFIX):
            if mk is None:
                return ANONYMOUS_LOCAL
            raise invalid_key()
        h = hash_key(token)
        now = self.clock()
        e = self._cache.get(h)
        if e is None or now - e.fetched >= self.current_ttl:
            loaded = await self._load(h, now, e)
            if loaded is _STORE_DOWN:  # (not held in `e`: compiled, `e` may only hold an entry or None)
                raise store_unavailable()
            e = loaded
            if e is None:
                if mk is None:
                    return ANONYMOUS_LOCAL
                raise invalid_key()
        if e.revoked:
            raise revoked_key()
        na = e.not_after
        if na is not None and self.wall() >= na:
            raise self._ended(e.record)
        return e.identity

    def _ended(self, rec: KeyRecord) -> GatewayError:
        st = rec.status(self.wall())
        if st == "rotated":
            return _unauthorized("this API key was rotated and its grace period has ended; use the new key",
                                 "rotated_api_key")
        return _unauthorized("this API key has expired", "expired_api_key")

    async def _load(self, h: str, now: float, stale: _Entry | None) -> Any:
        """The key's entry, None for an unknown key, or _STORE_DOWN when the store failed."""
        neg = self._negative.get(h)
        if neg is not None and now < neg:
            return None
        fut = self._inflight.get(h)
        if fut is not None:  # another request is already reading this key: share its answer
            return await asyncio.shield(fut)
        fut = asyncio.get_running_loop().create_future()
        self._inflight[h] = fut
        try:
            assert self.store is not None
            self.db_lookups += 1
            try:
                rec = await self.store.by_hash(h)
            except DB_UNAVAILABLE as exc:  # an outage (a bug of ours propagates: a loud 500)
                if not self._db_outage:
                    log.error("API key lookup failed (%s: %s)%s", type(exc).__name__, exc,
                              "; serving cached keys" if stale else "")
                    self._db_outage = True
                if stale is not None:
                    fut.set_result(stale)
                    return stale
                fut.set_result(_STORE_DOWN)
                return _STORE_DOWN
            if self._db_outage:
                log.warning("API key lookups work again")
                self._db_outage = False
            if rec is None:
                if len(self._negative) >= NEGATIVE_MAX:
                    self._negative.clear()
                self._negative[h] = now + min(NEGATIVE_TTL, self.current_ttl)
                fut.set_result(None)
                return None
            e = _Entry(rec, now)
            self._cache[h] = e
            fut.set_result(e)
            return e
        finally:
            self._inflight.pop(h, None)

    async def authorize(self, token: str | None, action: str) -> Identity:
        ident = await self.identify(token)
        allowed = PERMISSIONS.get(action, PERMISSIONS["admin"])
        if ident.role not in allowed:
            raise GatewayError(403, f"this API key has the role {ident.role!r}, which may not use {action}; "
                                    f"that needs one of: {', '.join(sorted(allowed))}", type="permission_error",
                               code="insufficient_permissions")
        return ident
