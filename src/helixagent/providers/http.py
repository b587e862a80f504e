"""Pooled upstream HTTP for providers: one connection pool per provider, honouring the `http:` block.

The client is :mod:`helixagent.providers.h1`, a small HTTP/1.1 client on the gateway's own event loop
(asyncio protocols + httptools), chosen by measurement over pyreqwest and aiohttp's client (README,
"Hot-path dependencies").  Everything client-specific stays in this module and ``h1``: providers see
``post``/``open_stream``/``get`` and only ever get :class:`GatewayError` out of it.

Timeouts (per provider): ``connect_timeout_ms`` bounds the TCP/TLS connect, ``first_byte_timeout_ms``
(default ``timeout_ms``) bounds every read -- the wait for the response head and each later read --
and ``timeout_ms`` bounds a whole non-streamed exchange.  A stream has no total bound: it ends when the
upstream ends it, or stalls past the read timeout.

Cancellation: a request cancelled at any point (the client left, a hedge lost, a deadline) closes its
upstream connection at once, so the upstream sees the caller leave and stops generating.
"""
from __future__ import annotations

import asyncio
from typing import AsyncIterator

from ..config import HTTPConfig, ProviderConfig
from ..errors import GatewayError
from . import h1


class Timeouts:
    __slots__ = ("connect", "first_byte", "total")

    def __init__(self, cfg: ProviderConfig):
        total = cfg.timeout_ms / 1000.0
        self.total = total
        self.connect = min(total, (cfg.connect_timeout_ms or min(cfg.timeout_ms, 10000)) / 1000.0)
        self.first_byte = min(total, (cfg.first_byte_timeout_ms or cfg.timeout_ms) / 1000.0)


class Headers:
    """Case-insensitive read access to response headers (``.get(name)``)."""

    __slots__ = ("_ex",)

    def __init__(self, ex: h1.Exchange):
        self._ex = ex

    def get(self, name: str, default: str | None = None) -> str | None:
        v = self._ex.header(name)
        return default if v is None else v

    def __getitem__(self, name: str) -> str:
        v = self._ex.header(name)
        if v is None:
            raise KeyError(name)
        return v

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self._ex.header(name) is not None


class UpstreamResponse:
    """A streamed upstream response: status, headers, and the body by chunks or whole."""

    __slots__ = ("_ex", "_http", "status", "headers")

    def __init__(self, ex: h1.Exchange, http: "UpstreamHTTP"):
        self._ex = ex
        self._http = http
        self.status: int = ex.status
        self.headers = Headers(ex)

    async def read(self) -> bytes:
        try:
            return await h1.read_all(self._ex)
        except h1.UpstreamTimeout:
            raise self._http.timeout_error() from None
        except h1.UpstreamBroken as exc:
            raise self._http.connection_error(exc) from None

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives (what is buffered at each step, in one piece).  Left before its end
        (closed, cancelled, failed), the exchange is finished: its connection is closed."""
        ex = self._ex
        ended = False
        try:
            while True:
                if ex.chunks:
                    yield ex.take()
                    continue
                if ex.done:
                    err = ex.error
                    if err is None:
                        ended = True
                        return
                    raise self._stream_error(err) from None
                await ex.wait()
        finally:
            if not ended:
                ex.finish()

    def _stream_error(self, err: BaseException) -> BaseException:
        name = self._http.provider.name
        if isinstance(err, h1.UpstreamTimeout):
            return GatewayError(504, f"provider {name!r} stalled mid-stream", code="upstream_timeout",
                                provider=name, retryable=True, kind="timeout")
        if isinstance(err, h1.UpstreamBroken):
            return GatewayError(502, f"provider {name!r} stream broke: {err.kind}", code="upstream_stream_error",
                                provider=name, retryable=True, kind="stream_error")
        return err

    def close(self) -> None:
        self._ex.finish()

    release = close


class UpstreamHTTP:
    def __init__(self, provider: ProviderConfig, http: HTTPConfig):
        self.provider = provider
        self.http = http
        self.timeouts = Timeouts(provider)
        self._pool: h1.Pool | None = None

    def pool(self) -> h1.Pool:
        p = self._pool
        if p is None or p.loop is not asyncio.get_running_loop():   # first use, or a new event loop
            p = self._pool = h1.Pool(self.timeouts.connect, self.http.max_idle_conns, self.http.idle_conn_timeout)
        return p

    async def close(self) -> None:
        p, self._pool = self._pool, None
        if p is not None:
            p.close()

    async def _exchange(self, method: str, url: str, body: bytes | None, headers: dict[str, str],
                        total: float | None) -> h1.Exchange:
        try:
            return await self.pool().open(method, url, headers, body, self.timeouts.first_byte, total)
        except h1.UpstreamTimeout:
            raise self.timeout_error() from None
        except (h1.UpstreamBroken, h1.BadRequestHeaders) as exc:
            raise self.connection_error(exc) from None

    async def post(self, url: str, body: bytes, headers: dict[str, str]) -> tuple[int, Headers, bytes]:
        """POST and read the whole body.  Network failures become retryable GatewayErrors."""
        ex = await self._exchange("POST", url, body, headers, self.timeouts.total)
        try:
            data = await h1.read_all(ex)
        except h1.UpstreamTimeout:
            raise self.timeout_error() from None
        except h1.UpstreamBroken as exc:
            raise self.connection_error(exc) from None
        return ex.status, Headers(ex), data

    async def open_stream(self, url: str, body: bytes, headers: dict[str, str]) -> UpstreamResponse:
        """POST and return once the response head has arrived; the caller iterates and closes."""
        return UpstreamResponse(await self._exchange("POST", url, body, headers, None), self)

    async def get(self, url: str, headers: dict[str, str]) -> tuple[int, bytes]:
        ex = await self._exchange("GET", url, None, headers, self.timeouts.total)
        try:
            return ex.status, await h1.read_all(ex)
        except h1.UpstreamTimeout:
            raise self.timeout_error() from None
        except h1.UpstreamBroken as exc:
            raise self.connection_error(exc) from None

    def timeout_error(self) -> GatewayError:
        return GatewayError(504, f"provider {self.provider.name!r} timed out", type="timeout_error",
                            code="upstream_timeout", provider=self.provider.name, retryable=True, kind="timeout")

    def connection_error(self, exc: BaseException) -> GatewayError:
        kind = exc.kind if isinstance(exc, h1.UpstreamBroken) else type(exc).__name__
        if isinstance(exc, h1.UpstreamBroken) and exc.kind == "ProxyError":
            kind = f"{kind} ({exc.detail})"   # what to fix is on the gateway's side: say what the proxy did
        return GatewayError(502, f"provider {self.provider.name!r} connection failed: {kind}",
                            type="upstream_error", code="upstream_connection_error",
                            provider=self.provider.name, retryable=True, kind="connection")
