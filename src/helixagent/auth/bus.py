"""Key-change notifications between gateway instances (Redis pub/sub with acknowledgements).

Every instance caches verified keys in process memory.  When a key is revoked, rotated or created, the
instance (or CLI) that made the change publishes the key ids on ``<prefix>:auth:keys``.  Each subscribed
instance drops those entries and acknowledges by pushing onto a per-message list; the publisher waits
until as many acknowledgements arrived as ``PUBLISH`` reported receivers (bounded by a timeout).  The
acknowledgement list is ``<prefix>:{auth:ack:<nonce>}`` (its own hash tag: one key, any Cluster slot); the
channel is a pub/sub channel, not a key (Cluster broadcasts classic PUBLISH to every node).  So
when ``POST /admin/keys/{id}/revoke`` or ``helixagent keys revoke`` returns, no instance still accepts
the key.  An instance whose subscription is down cannot hear changes: it then caches keys for at most
``fallback_ttl`` (1 s), and it empties its cache when the subscription comes back.
"""
from __future__ import annotations

import asyncio
import logging
import secrets
import time
from typing import Any, Callable

import orjson

from .. import redis_client
from ..redis_client import tagged

log = logging.getLogger("helixagent.auth")


def channel_of(prefix: str) -> str:
    return f"{prefix}:auth:keys"


# The bus holds one connection for its subscription and uses a few for acknowledgements and publishing
# (admin operations): a small pool; beyond it callers wait (PoolExhausted after BUS_POOL_TIMEOUT).
BUS_POOL_SIZE = 16
BUS_POOL_TIMEOUT = 5.0


def _client(url: str, blocking: bool = False) -> Any:
    return redis_client.make_client(url, pool_size=BUS_POOL_SIZE, pool_timeout=BUS_POOL_TIMEOUT,
                                    timeout=None if blocking else 1.0, connect_timeout=0.5, health_check_interval=5,
                                    retries=3)


async def _cluster_subscribers(redis: Any, channel: str) -> int | None:
    """On Redis Cluster, ``PUBLISH`` reaches the subscribers on every node but counts only those of the
    node it ran on: count them on every node first (``PUBSUB NUMSUB``), so the publisher waits for every
    instance's acknowledgement.  None: not a cluster (PUBLISH's count is exact)."""
    if not redis_client.is_cluster(redis):
        return None
    await redis.initialize()
    total = 0
    for node in redis.get_nodes():
        got = await redis.execute_command("PUBSUB NUMSUB", channel, target_nodes=node)
        total += sum(int(n) for _, n in _pairs(got))
    return total


def _pairs(got: Any) -> list[tuple[Any, Any]]:
    if isinstance(got, dict):
        return list(got.items())
    if got and isinstance(got[0], (list, tuple)):
        return [(a, b) for a, b in got]
    return list(zip(got[::2], got[1::2], strict=False))


async def publish(redis: Any, prefix: str, ids: list[str], wait: float = 2.0) -> tuple[int, int]:
    """Publish a change of ``ids``; wait for every receiver to acknowledge.  Returns (receivers, acks)."""
    nonce = secrets.token_hex(8)
    ack_key = tagged(prefix, "auth:ack:" + nonce)  # <prefix>:{auth:ack:<nonce>}: Cluster-safe
    channel = channel_of(prefix)
    cluster_subs = await _cluster_subscribers(redis, channel)
    receivers = int(await redis.publish(channel, orjson.dumps({"ids": ids, "ack": ack_key})))
    if cluster_subs is not None:
        receivers = max(receivers, cluster_subs)
    acks = 0
    deadline = time.monotonic() + wait
    while acks < receivers:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        got = await redis.blpop([ack_key], timeout=max(0.01, min(left, 1.0)))
        if got is not None:
            acks += 1
    try:
        await redis.delete(ack_key)
    except Exception:  # noqa: BLE001 - best-effort cleanup of the ack key, which expires anyway
        pass
    if acks < receivers:
        log.warning("key change %s: %d of %d gateway instances acknowledged within %.1fs; the others stop "
                    "using their cached copy within their cache TTL", ",".join(ids), acks, receivers, wait)
    return receivers, acks


async def publish_url(url: str, prefix: str, ids: list[str], wait: float = 2.0) -> tuple[int, int]:
    r = _client(url, blocking=True)
    try:
        return await publish(r, prefix, ids, wait)
    finally:
        await r.aclose()


class InvalidationBus:
    def __init__(self, url: str, prefix: str, on_change: Callable[[list[str] | None], None]):
        self.url = url
        self.prefix = prefix
        self.on_change = on_change   # ids, or None for "forget everything" (after a reconnect)
        self.healthy = False
        self.redis: Any = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._outage_logged = False
        self._ready = asyncio.Event()

    async def start(self, wait: float = 2.0) -> None:
        self.redis = _client(self.url, blocking=True)
        self._task = asyncio.ensure_future(self._run())
        try:
            await asyncio.wait_for(self._ready.wait(), wait)
        except asyncio.TimeoutError:
            pass

    async def stop(self) -> None:
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001 - shutdown: its end is not news
                pass
        if self.redis is not None:
            await self.redis.aclose()

    async def publish(self, ids: list[str]) -> tuple[int, int]:
        return await publish(self.redis, self.prefix, ids)

    async def _run(self) -> None:
        backoff = 0.1
        while not self._stopping:
            ps = None
            try:
                if redis_client.is_cluster(self.redis):
                    await self.redis.initialize()  # the slot map picks the node the subscription uses
                ps = self.redis.pubsub(ignore_subscribe_messages=True)
                await ps.subscribe(channel_of(self.prefix))
                self.on_change(None)  # messages may have been missed while we were not subscribed
                self.healthy = True
                backoff = 0.1
                if self._outage_logged:
                    log.warning("key-change subscription to Redis restored")
                    self._outage_logged = False
                self._ready.set()
                while True:
                    msg = await ps.get_message(timeout=5.0)
                    if msg is None:
                        await ps.ping()
                        continue
                    await self._handle(msg)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - Redis subscription boundary: marked unhealthy, logged, retried
                self.healthy = False
                if not self._outage_logged:
                    log.error("key-change subscription to Redis failed (%s); cached keys now expire after "
                              "1s until it is restored", type(exc).__name__)
                    self._outage_logged = True
                self._ready.set()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
            finally:
                try:
                    if ps is not None:
                        await ps.aclose()
                except Exception:  # noqa: BLE001 - closing a pubsub connection that may already be broken
                    pass

    async def _handle(self, msg: dict[str, Any]) -> None:
        try:
            data = orjson.loads(msg["data"])
            ids = [str(i) for i in data.get("ids") or ()]
        except Exception:  # noqa: BLE001 - a foreign/garbled message on the channel is ignored
            return
        self.on_change(ids)
        ack = data.get("ack")
        if isinstance(ack, str):
            await self.redis.rpush(ack, b"1")
            await self.redis.expire(ack, 30)
