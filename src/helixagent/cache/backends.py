"""Cache storage backends behind one interface.

``get(key) -> bytes | None`` and ``set(key, value, ttl)`` store opaque compact values (orjson bytes).
A backend that cannot be reached raises :class:`BackendUnavailable`; the cache then serves without
itself (the request goes upstream).  The in-memory backend is synchronous underneath (``sync = True``)
so the hot path does not pay for a coroutine.
"""
from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from typing import Any

from .. import redis_client
from ..redis_client import PoolExhausted
from ..store.crypto import TamperedRecord, UnknownKey

log = logging.getLogger("helixagent.cache")


class BackendUnavailable(Exception):
    """The backend could not be used for this operation (already counted and logged)."""


_STAT_FIELDS = ("hits", "misses", "bypasses", "coalesced", "stores", "evictions", "expirations", "errors",
                "entries", "bytes")


class CacheStats:
    """Counters exported by the observability module (``gw.services["cache"].stats``)."""

    __slots__ = _STAT_FIELDS

    def __init__(self) -> None:
        self.hits = 0          # answered without an upstream call (stored entry or in-flight leader)
        self.misses = 0        # looked up, not found, went upstream
        self.bypasses = 0      # not looked up (policy, Cache-Control: no-cache, "cache": false, backend down)
        self.coalesced = 0     # of the hits: followers of an identical in-flight request
        self.stores = 0        # entries written
        self.evictions = 0     # entries dropped to honour max_size / max_bytes (memory backend)
        self.expirations = 0   # entries found expired (memory backend; Redis expires on its own)
        self.errors = 0        # backend failures (Redis unreachable, timeouts, undecodable values)
        self.entries = 0       # current entries (memory backend)
        self.bytes = 0         # current value bytes (memory backend)

    def as_dict(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in _STAT_FIELDS}  # (a compiled class has no __slots__)


class Sealer:
    """Encrypts cache values with the records' keyring (``encryption:``; AES-256-GCM, key ids, rotation).

    A sealed value is ``0x02 | len(key id) | key id | Keyring ciphertext``; the associated data is the full
    Redis key, so a value copied under another cache key fails to decrypt.  A value that cannot be opened
    -- a key id no longer in the keyring, a modified or foreign value, a plaintext entry written before
    encryption was turned on -- is a cache MISS (counted in ``stats.errors``), never served and never a 500.
    """

    MAGIC = 0x02
    COLUMN = "cache"

    def __init__(self, keyring: Any):
        self.keyring = keyring
        kid = keyring.active_id.encode()
        self._head: bytes = bytes([self.MAGIC, len(kid)]) + kid

    def seal(self, key: str, value: bytes) -> bytes:
        sealed: bytes = self.keyring.encrypt(value, key, self.COLUMN)
        return self._head + sealed

    def unseal(self, key: str, blob: bytes) -> bytes | None:
        if len(blob) < 2 or blob[0] != self.MAGIC:
            return None
        n = blob[1]
        kid = blob[2:2 + n].decode("ascii", "replace")
        try:
            out: bytes = self.keyring.decrypt(blob[2 + n:], kid, key, self.COLUMN)
            return out
        except (UnknownKey, TamperedRecord):
            return None


class MemoryBackend:
    """An LRU bounded by entry count and optionally by value bytes; entries expire after ``ttl``."""

    sync = True

    def __init__(self, max_size: int, max_bytes: int | None, stats: CacheStats):
        self.max_size = max_size
        self.max_bytes = max_bytes
        self.stats = stats
        self.data: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self.bytes = 0

    def get_now(self, key: str) -> bytes | None:
        e = self.data.get(key)
        if e is None:
            return None
        if e[0] <= time.monotonic():
            del self.data[key]
            self._sub(len(e[1]))
            self.stats.expirations += 1
            return None
        self.data.move_to_end(key)
        return e[1]

    def set_now(self, key: str, value: bytes, ttl: float) -> bool:
        size = len(value)
        if self.max_bytes is not None and size > self.max_bytes:
            return False  # larger than the whole cache: never stored
        # A right-sized copy: orjson.dumps returns bytes in an over-allocated block (at least 4 KiB even
        # for a 200-byte body), so a cache of 1,000 small answers held 4 MB instead of 0.3 MB.
        value = bytes(memoryview(value))
        old = self.data.pop(key, None)
        if old is not None:
            self._sub(len(old[1]))
        self.data[key] = (time.monotonic() + ttl, value)
        self.bytes += size
        st = self.stats
        now = time.monotonic()
        while len(self.data) > self.max_size or (self.max_bytes is not None and self.bytes > self.max_bytes):
            _, (exp, v) = self.data.popitem(last=False)
            self.bytes -= len(v)
            if exp <= now:
                st.expirations += 1
            else:
                st.evictions += 1
        st.entries = len(self.data)
        st.bytes = self.bytes
        return True

    def _sub(self, n: int) -> None:
        self.bytes -= n
        self.stats.entries = len(self.data)
        self.stats.bytes = self.bytes

    async def get(self, key: str) -> bytes | None:
        return self.get_now(key)

    async def set(self, key: str, value: bytes, ttl: float) -> bool:
        return self.set_now(key, value, ttl)

    async def delete(self, key: str) -> None:
        e = self.data.pop(key, None)
        if e is not None:
            self._sub(len(e[1]))

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        self.data.clear()
        self.bytes = 0


class RedisBackend:
    """Redis with ``SET key value PX ttl``.  Shared by every gateway instance using the same URL and prefix.

    Outages: a failed operation is counted (``stats.errors``), logged once when the outage starts and once
    when Redis answers again; while down, operations are skipped without touching the network and one
    probe is let through every ``probe_interval`` seconds, so a dead or black-holed Redis costs requests
    nothing but the cache."""

    sync = False

    def __init__(self, url: str, prefix: str, timeout: float, stats: CacheStats, probe_interval: float = 1.0,
                 pool_size: int = 100, pool_timeout: float = 2.0, sealer: Sealer | None = None):
        if "{" in prefix or "}" in prefix:
            raise ValueError(f"cache.key_prefix must hold no braces: {prefix!r}")
        self.url = url
        self.sealer = sealer  # encryption.enabled: values are stored encrypted
        self.pool_size = pool_size
        self.pool_timeout = pool_timeout
        self.prefix = prefix
        self.timeout = timeout
        self.stats = stats
        self.probe_interval = probe_interval
        self.client: Any = None
        self.down = False
        self.retry_at = 0.0

    def _make_client(self) -> Any:
        return redis_client.make_client(self.url, pool_size=self.pool_size, pool_timeout=self.pool_timeout,
                                        timeout=self.timeout, connect_timeout=self.timeout)

    async def start(self) -> None:
        self.client = self._make_client()
        try:
            await self.client.ping()
            self._ok()
        except redis_client.OUTAGE as exc:  # a failed Redis: the gateway starts without the cache
            self._fail(exc)

    def _skip(self) -> bool:
        if not self.down:
            return False
        now = time.monotonic()
        if now < self.retry_at:
            return True
        self.retry_at = now + self.probe_interval  # this caller probes; the others keep skipping
        return False

    def _fail(self, exc: BaseException) -> None:
        self.stats.errors += 1
        self.retry_at = time.monotonic() + self.probe_interval
        if not self.down:
            self.down = True
            # the URL is not logged: it may carry a password
            log.warning("cache: Redis is unreachable (%s: %s); serving without the cache until it answers again",
                        type(exc).__name__, str(exc)[:200])

    def _ok(self) -> None:
        if self.down:
            self.down = False
            log.warning("cache: Redis answers again; the cache is back in use")

    async def _call(self, fn: Any, *args: Any) -> Any:
        if self.client is None:
            self.client = self._make_client()
        if self._skip():
            raise BackendUnavailable()
        try:
            out = await fn(*args)  # bounded by socket_timeout / socket_connect_timeout
        except redis_client.OUTAGE as exc:  # a failed Redis (anything else is a bug of ours and propagates)
            self._fail(exc)
            raise BackendUnavailable() from None
        except PoolExhausted:
            # every connection stayed busy for redis_pool_timeout: this request goes without the cache;
            # Redis itself is fine, so it is not marked down
            self.stats.errors += 1
            raise BackendUnavailable() from None
        self._ok()
        return out

    def rkey(self, key: str, *suffix: str) -> str:
        """The Redis key of an entry, ``<key_prefix>{<hash>}``, and of its flight state
        (``<key_prefix>{<hash>}:lead`` ...): one hash tag per entry, so everything of one entry is in one
        Cluster slot and entries spread over the cluster."""
        return self.prefix + "{" + key + "}" + "".join(":" + s for s in suffix)

    async def get(self, key: str) -> bytes | None:
        raw: bytes | None = await self._call(self.client_get, self.rkey(key))
        return self.opened(key, raw)

    def opened(self, key: str, raw: bytes | None, quiet: bool = False) -> bytes | None:
        """A stored value as read from Redis, decrypted.  ``quiet``: a second look-up of the same entry
        (an undecryptable value is counted once)."""
        if raw is None or self.sealer is None:
            return raw
        out = self.sealer.unseal(self.rkey(key), raw)
        if out is None and not quiet:
            self.stats.errors += 1  # a rotated-out key, a tampered or plaintext value: a miss
        return out

    async def set(self, key: str, value: bytes, ttl: float) -> bool:
        k = self.rkey(key)
        if self.sealer is not None:
            value = self.sealer.seal(k, value)
        await self._call(self.client_set, k, value, max(1, math.ceil(ttl * 1000)))
        return True

    async def delete(self, key: str) -> None:
        await self._call(self.client_delete, self.rkey(key))

    def client_get(self, k: str) -> Any:
        return self.client.get(k)

    def client_set(self, k: str, v: bytes, px: int) -> Any:
        return self.client.set(k, v, px=px)

    def client_delete(self, k: str) -> Any:
        return self.client.delete(k)

    async def close(self) -> None:
        if self.client is not None:
            try:
                await self.client.aclose()
            except redis_client.OUTAGE:
                pass
            self.client = None
