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

from typing import TYPE_CHECKING, Any, Callable
from urllib.parse import parse_qs, unquote

from .redaction import mask_url

if TYPE_CHECKING:
    from .redis_pools import OUTAGE as OUTAGE
    from .redis_pools import is_cluster as is_cluster
    from .redis_pools import make_client as make_client

# redis-py (with what it pulls in: opentelemetry, cryptography -- about 20 MB resident) is imported only
# when a client is built or an outage is matched, i.e. only when a Redis URL is configured: OUTAGE,
# make_client and is_cluster live in redis_pools and are resolved from here on first use.  Callers match
# ``except redis_client.OUTAGE`` (an attribute looked up when an exception is being matched), never bind
# OUTAGE at import time.
_LAZY = ("OUTAGE", "make_client", "is_cluster")


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from . import redis_pools
        return getattr(redis_pools, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

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
        from redis.asyncio.connection import parse_url as _redis_parse_url  # a Redis URL is configured
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
