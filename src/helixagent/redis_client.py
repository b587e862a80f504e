"""One way to build an asyncio Redis client (rate limits, cache, key-change bus).

redis-py's default pool raises ``MaxConnectionsError`` ("Too many connections", a ``ConnectionError``)
as soon as more commands are in flight than it has connections (100 by default).  Under load that is
indistinguishable from a dead Redis, and callers that treat ``ConnectionError`` as an outage switch
their feature off exactly when the traffic is highest.  Here pool exhaustion is back-pressure instead:

* at most ``pool_size`` connections are open; a command that finds them all busy WAITS for one to be
  released, at most ``pool_timeout`` seconds;
* a wait that runs out raises :class:`PoolExhausted` -- the gateway is overloaded, Redis is not down.
  It is not a ``redis`` exception, so no caller mistakes it for an outage;
* :data:`OUTAGE` is what a failed Redis raises (refused or reset connection, connect or command
  timeout on the socket, a Redis that is loading or rejects our credentials).  Anything else --
  a Lua error, a wrong argument -- is a bug of ours and propagates.
"""
from __future__ import annotations

import asyncio
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.connection import ConnectionPool
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff, NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

# What a failed (unreachable, slow, restarting) Redis raises.  OSError covers a socket error that
# redis-py did not wrap.
OUTAGE: tuple[type[Exception], ...] = (RedisConnectionError, RedisTimeoutError, OSError)


class PoolExhausted(Exception):
    """Every pooled connection stayed busy for ``pool_timeout`` seconds: overload, not an outage."""


class BoundedPool(ConnectionPool):
    """A connection pool of at most ``max_connections`` connections where a caller that finds them all in
    use waits (bounded by ``pool_timeout``) instead of failing.  Fair: waiters are served in order.

    The slot accounting: a slot is taken before the base pool hands out a connection and belongs to that
    connection until :meth:`release`; if the base pool fails to hand one out (connect error,
    cancellation), the slot is given back here."""

    def __init__(self, *, pool_timeout: float, **kwargs: Any):
        super().__init__(**kwargs)
        self.pool_timeout = pool_timeout
        self._slots = asyncio.Semaphore(self.max_connections)
        self._holding: set[Any] = set()   # connections that hold a slot (handed out, not yet released)
        self.waits = 0        # commands that found every connection busy and waited
        self.exhausted = 0    # of those, waits that ran out (PoolExhausted)

    async def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        slots = self._slots
        if slots.locked():
            self.waits += 1
            try:
                await asyncio.wait_for(slots.acquire(), self.pool_timeout)
            except asyncio.TimeoutError:
                self.exhausted += 1
                raise PoolExhausted(f"no Redis connection became free within {self.pool_timeout:g}s "
                                    f"(all {self.max_connections} in use)") from None
        else:
            await slots.acquire()
        try:
            conn = await super().get_connection()  # type: ignore[no-untyped-call]
        except BaseException:
            slots.release()
            raise
        self._holding.add(conn)
        return conn

    async def release(self, connection: Any) -> None:
        try:
            await super().release(connection)
        finally:
            if connection in self._holding:
                self._holding.discard(connection)
                self._slots.release()


def make_client(url: str, *, pool_size: int, pool_timeout: float, timeout: float | None,
                connect_timeout: float, health_check_interval: int = 0, retries: int = 0) -> Any:
    """An ``redis.asyncio.Redis`` on a :class:`BoundedPool`.  ``retries`` 0 (limits, cache): no retry by
    redis-py, the caller decides at once what a failure means.  ``timeout`` None: no socket timeout
    (blocking commands, pub/sub)."""
    retry = Retry(ExponentialWithJitterBackoff(base=0.01, cap=0.5), retries) if retries else Retry(NoBackoff(), 0)
    pool = BoundedPool.from_url(url, max_connections=pool_size, pool_timeout=pool_timeout,
                                socket_timeout=timeout, socket_connect_timeout=connect_timeout,
                                retry=retry, retry_on_timeout=False,
                                health_check_interval=health_check_interval)
    return aioredis.Redis.from_pool(pool)  # the client owns the pool: aclose() closes it
