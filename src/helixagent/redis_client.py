"""One way to build an asyncio Redis client (rate limits, cache, key-change bus, flights).

URL kinds (:func:`parse_url`), each with the same pool semantics:

* ``redis://[user:password@]host:port/db`` and ``rediss://...`` (TLS; redis-py's query options such as
  ``?ssl_cert_reqs=required&ssl_ca_certs=/path/ca.pem``, ``ssl_certfile``/``ssl_keyfile`` for a client
  certificate, ``ssl_check_hostname``);
* ``redis+sentinel://[user:password@]host:26379[,host2:26379]/<service>[/<db>]`` (``rediss+sentinel``:
  TLS to the master).  The master is discovered through the sentinels and re-discovered after a
  failover.  The password is the master's; ``?sentinel_password=`` (and ``sentinel_username``) authenticate
  to the sentinels when they require it;
* ``redis+cluster://[user:password@]host:port[,host:port]`` (``rediss+cluster``: TLS).  Any reachable
  node bootstraps the slot map.  Every key the gateway writes carries a hash tag (:func:`tagged`), so each
  Lua script touches one slot.

redis-py's default pool raises ``MaxConnectionsError`` ("Too many connections", a ``ConnectionError``)
as soon as more commands are in flight than it has connections (100 by default).  Under load that is
indistinguishable from a dead Redis, and callers that treat ``ConnectionError`` as an outage switch
their feature off exactly when the traffic is highest.  Here pool exhaustion is back-pressure instead:

* at most ``pool_size`` connections are open (Cluster: at most ``pool_size`` commands in flight over the
  whole cluster, so no node's connection list is ever exceeded); a command that finds them all busy
  WAITS for one to be released, at most ``pool_timeout`` seconds;
* a wait that runs out raises :class:`PoolExhausted` -- the gateway is overloaded, Redis is not down.
  It is not a ``redis`` exception, so no caller mistakes it for an outage;
* :data:`OUTAGE` is what a failed Redis raises (refused or reset connection, connect or command
  timeout on the socket, a Redis that is loading or rejects our credentials, no master known to the
  sentinels, a cluster that is down or has no reachable node).  Anything else -- a Lua error, a wrong
  argument -- is a bug of ours and propagates.

No password reaches a log line or an error message: :func:`helixagent.redaction.mask_url` is what callers
may show of a URL.
"""
from __future__ import annotations

import asyncio
from typing import Any, Callable
from urllib.parse import parse_qs, unquote

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import ConnectionPool, parse_url as _redis_parse_url
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import ExponentialWithJitterBackoff, NoBackoff
from redis.exceptions import ClusterDownError, RedisClusterException
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .redaction import mask_url

# What a failed (unreachable, slow, restarting) Redis raises.  OSError covers a socket error that
# redis-py did not wrap.  MasterNotFoundError (Sentinel) is a ConnectionError.
OUTAGE: tuple[type[Exception], ...] = (RedisConnectionError, RedisTimeoutError, OSError, ClusterDownError)

SCHEMES = ("redis", "rediss", "redis+sentinel", "rediss+sentinel", "redis+cluster", "rediss+cluster")


class PoolExhausted(Exception):
    """Every pooled connection stayed busy for ``pool_timeout`` seconds: overload, not an outage."""


# -- keys ---------------------------------------------------------------------------------------------

def tagged(prefix: str, tag: str, *parts: str) -> str:
    """``prefix:{tag}:part:...`` -- a key whose Cluster hash slot is decided by ``tag`` alone, so every
    key built with the same tag lives in one slot (one Lua script or MULTI may touch them all).
    ``tagged("helixagent", "health:openai", "breaker")`` -> ``helixagent:{health:openai}:breaker``."""
    if not tag or "{" in tag or "}" in tag:
        raise ValueError(f"a hash tag must be non-empty and hold no braces: {tag!r}")
    if "{" in prefix:
        raise ValueError(f"a key prefix must hold no '{{': it would become the hash tag: {prefix!r}")
    return ":".join((prefix, "{" + tag + "}", *parts)) if prefix else ":".join(("{" + tag + "}", *parts))


def is_cluster(client: Any) -> bool:
    return isinstance(client, RedisCluster)


# -- URLs ---------------------------------------------------------------------------------------------

class RedisURL:
    """A parsed Redis URL.  ``kind``: ``single`` | ``sentinel`` | ``cluster``."""

    __slots__ = ("kind", "tls", "hosts", "service", "db", "username", "password", "options", "raw")

    def __init__(self, kind: str, tls: bool, hosts: list[tuple[str, int]], service: str | None, db: int,
                 username: str | None, password: str | None, options: dict[str, str], raw: str):
        self.kind = kind
        self.tls = tls
        self.hosts = hosts
        self.service = service
        self.db = db
        self.username = username
        self.password = password
        self.options = options
        self.raw = raw


def _hosts(netloc: str, default_port: int, scheme: str) -> list[tuple[str, int]]:
    out: list[tuple[str, int]] = []
    for part in netloc.split(","):
        part = part.strip()
        if not part:
            continue
        if part.startswith("["):  # [ipv6]:port
            host, _, port = part[1:].partition("]")
            port = port.lstrip(":")
        else:
            host, _, port = part.rpartition(":") if ":" in part else (part, "", "")
        try:
            p = int(port) if port else default_port
        except ValueError:
            raise ValueError(f"{scheme}:// URL: port {port!r} is not a number") from None
        if not host or not 0 < p < 65536:
            raise ValueError(f"{scheme}:// URL: bad host:port {part!r}")
        out.append((host, p))
    if not out:
        raise ValueError(f"{scheme}:// URL names no host")
    return out


def parse_url(url: str) -> RedisURL:
    """Validate and parse a Redis URL of any supported kind.  Errors never quote the password."""
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in SCHEMES and scheme != "unix":
        raise ValueError(f"unsupported Redis URL {mask_url(url)!r}: the scheme must be one of "
                         f"{', '.join(s + '://' for s in SCHEMES)} or unix://")
    if scheme in ("redis", "rediss", "unix"):
        try:
            kw = _redis_parse_url(url)
        except ValueError as exc:
            raise ValueError(f"bad Redis URL {mask_url(url)!r}: {str(exc).split(':')[0]}") from None
        return RedisURL("single", scheme == "rediss", [(str(kw.get("host", "")), int(kw.get("port", 6379)))],
                        None, int(kw.get("db", 0) or 0), kw.get("username"), kw.get("password"), {}, url)
    tls = scheme.startswith("rediss")
    netloc, _, tail = rest.partition("/")
    tail, _, query = tail.partition("?")
    if "?" in netloc:  # redis+cluster://h:1,h:2?ssl_cert_reqs=...
        netloc, _, query = netloc.partition("?")
    username = password = None
    if "@" in netloc:
        cred, _, netloc = netloc.rpartition("@")
        u, has_pw, pw = cred.partition(":")
        username = unquote(u) or None
        password = unquote(pw) if has_pw else None
    options = {k: v[0] for k, v in parse_qs(query).items() if v}
    if scheme.endswith("sentinel"):
        hosts = _hosts(netloc, 26379, scheme)
        segs = [s for s in tail.split("/") if s]
        if not segs:
            raise ValueError(f"{scheme}:// URL {mask_url(url)!r} names no service: "
                             f"{scheme}://host:26379[,host2:26379]/<service>[/<db>]")
        try:
            db = int(segs[1]) if len(segs) > 1 else 0
        except ValueError:
            raise ValueError(f"{scheme}:// URL {mask_url(url)!r}: the database must be a number") from None
        return RedisURL("sentinel", tls, hosts, unquote(segs[0]), db, username, password, options, url)
    hosts = _hosts(netloc, 6379, scheme)
    if tail.strip("/") not in ("", "0"):
        raise ValueError(f"{scheme}:// URL {mask_url(url)!r}: Redis Cluster has only database 0")
    return RedisURL("cluster", tls, hosts, None, 0, username, password, options, url)


_TLS_OPTS: dict[str, Callable[[str], Any]] = {
    "ssl_cert_reqs": str, "ssl_ca_certs": str, "ssl_certfile": str, "ssl_keyfile": str, "ssl_ca_path": str,
    "ssl_password": str, "ssl_check_hostname": lambda v: str(v).lower() in ("1", "true", "yes", "on")}


def _tls_kwargs(u: RedisURL) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in u.options.items():
        conv = _TLS_OPTS.get(k)
        if conv is not None:
            out[k] = conv(v)
        elif k not in ("sentinel_password", "sentinel_username"):
            raise ValueError(f"Redis URL {mask_url(u.raw)!r}: unknown option {k!r} (known: "
                             f"{', '.join(sorted([*_TLS_OPTS, 'sentinel_password', 'sentinel_username']))})")
    if out and not u.tls:
        raise ValueError(f"Redis URL {mask_url(u.raw)!r}: ssl_* options need a rediss scheme")
    return out


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
        sentinel = Sentinel(u.hosts, sentinel_kwargs=skw)  # type: ignore[no-untyped-call]
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
