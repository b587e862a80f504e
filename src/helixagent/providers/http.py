"""Pooled upstream HTTP for providers: one client session per provider, honouring the `http:` block.

aiohttp's client was chosen by measurement (see README, "Design"): it is the fastest mature asyncio
client with streaming, per-request timeouts and connection pooling.
"""
from __future__ import annotations

import asyncio
from typing import AsyncIterator

import aiohttp

from ..config import HTTPConfig, ProviderConfig
from ..errors import GatewayError


class Timeouts:
    __slots__ = ("connect", "first_byte", "total")

    def __init__(self, cfg: ProviderConfig):
        total = cfg.timeout_ms / 1000.0
        self.total = total
        self.connect = min(total, (cfg.connect_timeout_ms or min(cfg.timeout_ms, 10000)) / 1000.0)
        self.first_byte = min(total, (cfg.first_byte_timeout_ms or cfg.timeout_ms) / 1000.0)


class UpstreamResponse:
    """A streamed upstream response: status, headers, and the body by lines or whole."""

    __slots__ = ("_resp", "status", "headers", "_idle")

    def __init__(self, resp: aiohttp.ClientResponse, idle: float):
        self._resp = resp
        self.status = resp.status
        self.headers = resp.headers
        self._idle = idle

    async def read(self) -> bytes:
        return await self._resp.read()

    async def lines(self) -> AsyncIterator[bytes]:
        content = self._resp.content
        while True:
            line = await asyncio.wait_for(content.readline(), self._idle) if self._idle else await content.readline()
            if not line:
                return
            yield line

    def close(self) -> None:
        self._resp.close()

    def release(self) -> None:
        self._resp.release()


class UpstreamHTTP:
    def __init__(self, provider: ProviderConfig, http: HTTPConfig):
        self.provider = provider
        self.http = http
        self.timeouts = Timeouts(provider)
        self._session: aiohttp.ClientSession | None = None

    def session(self) -> aiohttp.ClientSession:
        s = self._session
        if s is None or s.closed:
            conn = aiohttp.TCPConnector(limit=self.http.max_idle_conns,
                                        limit_per_host=self.http.max_conns_per_host,
                                        keepalive_timeout=self.http.idle_conn_timeout,
                                        ttl_dns_cache=300, enable_cleanup_closed=True)
            s = self._session = aiohttp.ClientSession(connector=conn, auto_decompress=True,
                                                      skip_auto_headers=("User-Agent",))
        return s

    async def close(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()

    def _timeout(self, stream: bool) -> aiohttp.ClientTimeout:
        t = self.timeouts
        if stream:  # total bounds only the wait for the first byte; the body may take longer per chunk
            return aiohttp.ClientTimeout(total=None, connect=t.connect, sock_connect=t.connect,
                                         sock_read=t.first_byte)
        return aiohttp.ClientTimeout(total=t.total, connect=t.connect, sock_connect=t.connect,
                                     sock_read=t.first_byte)

    async def post(self, url: str, body: bytes, headers: dict[str, str]) -> tuple[int, "aiohttp.typedefs.LooseHeaders", bytes]:
        """POST and read the whole body.  Network failures become retryable GatewayErrors."""
        try:
            async with self.session().post(url, data=body, headers=headers, timeout=self._timeout(False)) as r:
                data = await r.read()
                return r.status, r.headers, data
        except asyncio.TimeoutError:
            raise self.timeout_error() from None
        except aiohttp.ClientError as exc:
            raise self.connection_error(exc) from None

    async def open_stream(self, url: str, body: bytes, headers: dict[str, str]) -> UpstreamResponse:
        """POST and return once the response head has arrived; the caller iterates lines and closes."""
        try:
            resp = await self.session().post(url, data=body, headers=headers, timeout=self._timeout(True))
        except asyncio.TimeoutError:
            raise self.timeout_error() from None
        except aiohttp.ClientError as exc:
            raise self.connection_error(exc) from None
        return UpstreamResponse(resp, self.timeouts.total)

    async def get(self, url: str, headers: dict[str, str]) -> tuple[int, bytes]:
        try:
            async with self.session().get(url, headers=headers, timeout=self._timeout(False)) as r:
                return r.status, await r.read()
        except asyncio.TimeoutError:
            raise self.timeout_error() from None
        except aiohttp.ClientError as exc:
            raise self.connection_error(exc) from None

    def timeout_error(self) -> GatewayError:
        return GatewayError(504, f"provider {self.provider.name!r} timed out", type="timeout_error",
                            code="upstream_timeout", provider=self.provider.name, retryable=True, kind="timeout")

    def connection_error(self, exc: BaseException) -> GatewayError:
        return GatewayError(502, f"provider {self.provider.name!r} connection failed: {type(exc).__name__}",
                            type="upstream_error", code="upstream_connection_error",
                            provider=self.provider.name, retryable=True, kind="connection")
