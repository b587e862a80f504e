"""The bounded redis-py pools and clients behind :mod:`helixagent.redis_client` (see its docstring for the
pool semantics and :data:`OUTAGE`).  Imported only when a Redis URL is configured: redis-py is heavy."""
from __future__ import annotations

import asyncio
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import ConnectionPool
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import ExponentialWithJitterBackoff, NoBackoff
from redis.exceptions import ClusterDownError, RedisClusterException
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .redis_client import PoolExhausted, _tls_kwargs, parse_url

# What a failed (unreachable, slow, restarting) Redis raises.  OSError covers a socket error that
# redis-py did not wrap.  MasterNotFoundError (Sentinel) is a ConnectionError.
OUTAGE: tuple[type[Exception], ...] = (RedisConnectionError, RedisTimeoutError, OSError, ClusterDownError)


def is_cluster(client: Any) -> bool:
    return isinstance(client, RedisCluster)


# -- pools ----------------------------------------------------------------------------------------------

async def take_slot(owner: Any, slots: asyncio.Semaphore, what: str, size: int) -> None:
    """One of ``size`` slots: at once when one is free, else waiting at most ``owner.pool_timeout`` (counted
    in ``owner.waits``; a wait that runs out is counted in ``owner.exhausted`` and raises PoolExhausted)."""
    if not slots.locked():
        await slots.acquire()
        return
    owner.waits += 1
    try:
        await asyncio.wait_for(slots.acquire(), owner.pool_timeout)
    except asyncio.TimeoutError:
        owner.exhausted += 1
        raise PoolExhausted(f"no {what} connection became free within {owner.pool_timeout:g}s "
                            f"(all {size} in use)") from None


class _Bounded:
    """The bounded, fair wait for a connection (mixed into a redis-py ``ConnectionPool``).

    The slot accounting: a slot is taken before the base pool hands out a connection and belongs to that
    connection until :meth:`release`; if the base pool fails to hand one out (connect error,
    cancellation), the slot is given back here."""

    max_connections: int

    def _bound(self, pool_timeout: float) -> None:
        self.pool_timeout = pool_timeout
        self._slots = asyncio.Semaphore(self.max_connections)
        self._holding: set[Any] = set()   # connections that hold a slot (handed out, not yet released)
        self.waits = 0        # commands that found every connection busy and waited
        self.exhausted = 0    # of those, waits that ran out (PoolExhausted)

    async def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        slots = self._slots
        await take_slot(self, slots, "Redis", self.max_connections)
        try:
            conn = await super().get_connection()  # type: ignore[misc]
        except BaseException:
            slots.release()
            raise
        self._holding.add(conn)
        return conn

    async def release(self, connection: Any) -> None:
        try:
            await super().release(connection)  # type: ignore[misc]
        finally:
            if connection in self._holding:
                self._holding.discard(connection)
                self._slots.release()


class BoundedPool(_Bounded, ConnectionPool):
    """A connection pool of at most ``max_connections`` connections where a caller that finds them all in
    use waits (bounded by ``pool_timeout``) instead of failing.  Fair: waiters are served in order."""

    def __init__(self, *, pool_timeout: float, **kwargs: Any):
        ConnectionPool.__init__(self, **kwargs)
        self._bound(pool_timeout)


class BoundedSentinelPool(_Bounded, SentinelConnectionPool):
    """:class:`BoundedPool` for the master behind Redis Sentinel."""

    def __init__(self, service_name: str, sentinel_manager: Any, *, pool_timeout: float, **kwargs: Any):
        SentinelConnectionPool.__init__(self, service_name, sentinel_manager, **kwargs)  # type: ignore[no-untyped-call]
        self._bound(pool_timeout)


class SentinelRedis(aioredis.Redis):
    """The master's client; closing it also closes the connections to the sentinels."""

    sentinel: Any = None

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        try:
            await super().aclose(close_connection_pool)
        finally:
            s = self.sentinel
            if s is not None:
                self.sentinel = None
                for c in s.sentinels:
                    await c.aclose()


class BoundedCluster(RedisCluster):
    """A Redis Cluster client with at most ``pool_size`` commands in flight (waiters bounded by
    ``pool_timeout``, then :class:`PoolExhausted`).  A cluster none of whose nodes answers raises a
    ``ConnectionError`` (an :data:`OUTAGE`), not redis-py's bare ``RedisClusterException``."""

    def __init__(self, *, pool_size: int, pool_timeout: float, **kwargs: Any):
        # per node: the command bound plus a few for pub/sub connections, which hold one for their life
        super().__init__(max_connections=pool_size + 4, **kwargs)
        self.pool_size = pool_size
        self.pool_timeout = pool_timeout
        self._slots = asyncio.Semaphore(pool_size)
        self._init_lock = asyncio.Lock()
        self.waits = 0
        self.exhausted = 0

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        slots = self._slots
        await take_slot(self, slots, "Redis Cluster", self.pool_size)
        try:
            if self._initialize:
                # one bootstrap of the slot map before any command: commands racing redis-py's own lazy
                # initialisation saw their connections closed under them ("Connection closed by server")
                async with self._init_lock:
                    if self._initialize:
                        await self.initialize()
            return await super().execute_command(*args, **kwargs)
        except RedisClusterException as exc:
            cause = exc.__cause__ or exc.__context__
            if isinstance(cause, OUTAGE) or "cannot be connected" in str(exc):
                raise RedisConnectionError(f"Redis Cluster unreachable: {type(cause).__name__}") from None
            raise
        finally:
            slots.release()


def make_client(url: str, *, pool_size: int, pool_timeout: float, timeout: float | None,
                connect_timeout: float, health_check_interval: int = 0, retries: int = 0) -> Any:
    """An ``redis.asyncio.Redis`` (or ``RedisCluster``) with bounded connections, for any URL kind.
    ``retries`` 0 (limits, cache): no retry by redis-py, the caller decides at once what a failure means.
    ``timeout`` None: no socket timeout (blocking commands, pub/sub)."""
    u = parse_url(url)
    retry = Retry(ExponentialWithJitterBackoff(base=0.01, cap=0.5), retries) if retries else Retry(NoBackoff(), 0)
    common: dict[str, Any] = dict(socket_timeout=timeout, socket_connect_timeout=connect_timeout,
                                  health_check_interval=health_check_interval)
    if u.kind == "single":
        pool = BoundedPool.from_url(url, max_connections=pool_size, pool_timeout=pool_timeout, retry=retry,
                                    retry_on_timeout=False, **common)
        return aioredis.Redis.from_pool(pool)  # the client owns the pool: aclose() closes it
    tls = _tls_kwargs(u)
    auth: dict[str, Any] = {}
    if u.username:
        auth["username"] = u.username
    if u.password is not None:
        auth["password"] = u.password
    if u.kind == "sentinel":
        skw: dict[str, Any] = {"socket_timeout": connect_timeout if timeout is None else timeout,
                               "socket_connect_timeout": connect_timeout}
        if "sentinel_password" in u.options:
            skw["password"] = u.options["sentinel_password"]
        if "sentinel_username" in u.options:
            skw["username"] = u.options["sentinel_username"]
        sentinel = Sentinel(u.hosts, sentinel_kwargs=skw)  # type: ignore[no-untyped-call, unused-ignore]  # typed from redis 8
        conn_kw = dict(common, db=u.db, retry=retry, retry_on_timeout=False, **auth, **tls)
        if u.tls:
            conn_kw["ssl"] = True
        client = sentinel.master_for(u.service or "", redis_class=SentinelRedis,
                                     connection_pool_class=BoundedSentinelPool, max_connections=pool_size,
                                     pool_timeout=pool_timeout, **conn_kw)
        client.sentinel = sentinel
        return client
    nodes = [ClusterNode(h, p) for h, p in u.hosts]
    return BoundedCluster(startup_nodes=nodes, pool_size=pool_size, pool_timeout=pool_timeout,
                          ssl=u.tls, retry=Retry(NoBackoff(), retries), **auth, **tls, **common)
