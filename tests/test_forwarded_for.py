"""X-Forwarded-For is read from the right, through trusted proxies only (issue 12, item 6).

A proxy appends the address it received the request from; whatever is further left was written by the
client.  The gateway used to take the leftmost entry, so a client behind a proxy could pick its own
address and walk past a per-IP limit.  Over real HTTP: a small reverse proxy (aiohttp, appending the
peer's address as nginx's ``$proxy_add_x_forwarded_for`` does) in front of the gateway, and clients bound
to distinct loopback addresses (127.0.0.5, 127.0.0.6) that forge the header.
"""
from __future__ import annotations

from typing import Any

import httpx
import orjson
import pytest
from aiohttp import ClientSession, web

from helixagent.api.forwarded import MAX_HOPS, ForwardedFor
from helixagent.api.http import Request
from helixagent.config import ConfigError, load_config_dict
from helixagent.observability.logs import configure_logging, reset_logging
from support.keys import MODEL
from support.servers import AiohttpServer, wait_until

LIMIT = 10
BODY = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}


class AppendingProxy:
    """A reverse proxy that appends its peer's address to X-Forwarded-For (one header line, like nginx)."""

    def __init__(self, upstream: str):
        self.upstream = upstream
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.server = AiohttpServer(app)
        self.url = self.server.url

    async def handle(self, request: web.Request) -> web.Response:
        prior = ", ".join(request.headers.getall("X-Forwarded-For", []))
        fwd = f"{prior}, {request.remote}" if prior else request.remote
        headers = {k: v for k, v in request.headers.items()
                   if k.lower() not in ("host", "x-forwarded-for", "content-length", "transfer-encoding")}
        headers["X-Forwarded-For"] = fwd
        async with ClientSession() as s:
            async with s.request(request.method, self.upstream + request.path_qs, headers=headers,
                                 data=await request.read()) as r:
                return web.Response(status=r.status, body=await r.read(),
                                    headers={"content-type": r.headers.get("content-type", "application/json")})

    def close(self) -> None:
        self.server.close()


def client_from(addr: str) -> httpx.Client:
    return httpx.Client(transport=httpx.HTTPTransport(local_address=addr), timeout=10)


def statuses(client: httpx.Client, url: str, forged: list[str | None]) -> list[int]:
    out = []
    for f in forged:
        h = {"x-forwarded-for": f} if f is not None else {}
        out.append(client.post(url + "/v1/chat/completions", json=BODY, headers=h).status_code)
    return out


def forgeries(n: int) -> list[str | None]:
    """Every request claims to come from somewhere else: one entry, several, junk, IPv6, or nothing."""
    out: list[str | None] = []
    for i in range(n):
        out.append([f"203.0.113.{i}", f"198.51.100.{i}, 192.0.2.{i}", f"2001:db8::{i:x}", None,
                    f"10.9.8.{i}, unknown", f"127.0.0.{100 + i}"][i % 6])
    return out


@pytest.fixture
def logfile(tmp_path):
    path = tmp_path / "helix.log"
    configure_logging(load_config_dict({"logging": {"file": str(path), "format": "json"}}).logging)
    yield path
    reset_logging()


def _access_ips(logfile: Any) -> list[tuple[str, str]]:
    out = []
    for raw in logfile.read_text().splitlines():
        d = orjson.loads(raw)
        if d.get("logger") == "helixagent.access":
            out.append((d.get("path"), d.get("ip")))
    return out


@pytest.mark.parametrize("server", [
    {"trusted_proxies": ["127.0.0.1/32"]},
    {"trust_forwarded_for": True},  # no list: the immediate peer is the one trusted proxy
], ids=["trusted_proxies", "trust_forwarded_for"])
def test_forged_forwarded_for_behind_a_proxy_cannot_bypass_the_ip_limit(make_gateway, logfile, server):
    gw = make_gateway({"server": server, "rate_limits": {"ip": {"requests_per_minute": LIMIT}},
                       "logging": {"file": str(logfile), "format": "json"}})
    proxy = AppendingProxy(gw.url)
    try:
        with client_from("127.0.0.5") as a, client_from("127.0.0.6") as b:
            codes = statuses(a, proxy.url, forgeries(30))
            assert codes.count(200) == LIMIT and codes.count(429) == 30 - LIMIT, codes
            # the limit is the real client's, not the proxy's: another client behind it still gets its own
            codes_b = statuses(b, proxy.url, forgeries(5))
            assert codes_b == [200] * 5
            assert a.get(proxy.url + "/v1/models").status_code == 200
    finally:
        proxy.close()
    assert wait_until(lambda: len(_access_ips(logfile)) >= 36, 5)
    seen = _access_ips(logfile)
    assert {ip for p, ip in seen if p == "/v1/models"} == {"127.0.0.5"}  # outside the pipeline too
    assert {ip for p, ip in seen} == {"127.0.0.5", "127.0.0.6"}


def test_untrusted_peer_forwarded_for_is_ignored(make_gateway):
    gw = make_gateway({"server": {"trusted_proxies": ["127.0.0.1/32", "10.0.0.0/8"]},
                       "rate_limits": {"ip": {"requests_per_minute": LIMIT}}})
    with client_from("127.0.0.5") as a, client_from("127.0.0.6") as b:
        codes = statuses(a, gw.url, forgeries(30))  # straight to the gateway, not through the proxy
        assert codes.count(200) == LIMIT and codes.count(429) == 30 - LIMIT, codes
        # a forged header naming a trusted proxy is no way in either
        codes = statuses(b, gw.url, ["10.0.0.1, 127.0.0.1"] * 15)
        assert codes.count(200) == LIMIT


# -- the rule, request by request ----------------------------------------------------------------------------

def ip_of(peer: str, xff: list[str] | str | None, trust: Any) -> str:
    values = [xff] if isinstance(xff, str) else (xff or [])
    headers = [(b"host", b"gw")] + [(b"x-forwarded-for", v.encode("latin-1")) for v in values]
    scope = {"type": "http", "method": "GET", "path": "/", "headers": headers, "client": (peer, 5000)}
    return Request(scope, None, None, trust).ip  # type: ignore[arg-type]


NETS = ForwardedFor(["10.0.0.0/8", "fd00::/8", "192.168.7.1"])


@pytest.mark.parametrize("peer,xff,want", [
    # the rightmost address that is not a trusted proxy, whatever the client wrote to its left
    ("10.0.0.2", "1.1.1.1, 203.0.113.9", "203.0.113.9"),
    ("10.0.0.2", "1.1.1.1, 203.0.113.9, 10.0.0.7, 192.168.7.1", "203.0.113.9"),
    ("10.0.0.2", "10.0.0.1, 203.0.113.9, 10.0.0.7", "203.0.113.9"),
    ("192.168.7.1", "203.0.113.9", "203.0.113.9"),
    ("10.0.0.2", ["1.1.1.1", "203.0.113.9, 10.0.0.3"], "203.0.113.9"),  # several header lines, in order
    ("10.0.0.2", "203.0.113.9:5123", "203.0.113.9"),                     # a port appended (Azure)
    # every entry a trusted proxy: the leftmost
    ("10.0.0.2", "10.0.0.9, 10.0.0.8", "10.0.0.9"),
    # IPv6: plain, bracketed with a port, upper case and zero runs made canonical, mapped IPv4
    ("fd00::1", "2001:db8::5", "2001:db8::5"),
    ("10.0.0.2", "[2001:DB8:0::0002]:443", "2001:db8::2"),
    ("::ffff:10.0.0.2", "2001:db8::1, fd00::9", "2001:db8::1"),
    ("10.0.0.2", "::ffff:203.0.113.9", "203.0.113.9"),
    # garbage ends the walk at the last trusted hop (never a made-up address)
    ("10.0.0.2", "203.0.113.9, not-an-ip, 10.0.0.7", "10.0.0.7"),
    ("10.0.0.2", "203.0.113.9, unknown", "10.0.0.2"),
    ("10.0.0.2", "203.0.113.9, ", "10.0.0.2"),
    ("10.0.0.2", "203.0.113.9, 999.1.1.1", "10.0.0.2"),
    ("10.0.0.2", "203.0.113.9, fe80::1%eth0", "10.0.0.2"),
    ("10.0.0.2", "203.0.113.9, " + "9" * 500, "10.0.0.2"),
    ("10.0.0.2", "", "10.0.0.2"),
    ("10.0.0.2", None, "10.0.0.2"),
    # an untrusted peer is the client, whatever it forwards
    ("203.0.113.50", "10.0.0.1, 198.51.100.1", "203.0.113.50"),
    ("2001:db8::99", "fd00::1", "2001:db8::99"),
    ("", "203.0.113.9", ""),
])
def test_trusted_networks_walk_from_the_right(peer, xff, want):
    assert ip_of(peer, xff, NETS) == want


@pytest.mark.parametrize("xff,want", [
    ("1.1.1.1, 203.0.113.9", "203.0.113.9"),
    ("203.0.113.9", "203.0.113.9"),
    (["1.1.1.1", "203.0.113.9"], "203.0.113.9"),
    ("2001:db8::1, [2001:db8::2]:80", "2001:db8::2"),
    ("203.0.113.9, junk", "127.0.0.1"),
    (None, "127.0.0.1"),
])
def test_trust_forwarded_for_alone_takes_the_rightmost_entry(xff, want):
    assert ip_of("127.0.0.1", xff, True) == want
    assert ip_of("127.0.0.1", xff, ForwardedFor()) == want


def test_no_trust_uses_the_peer():
    assert ip_of("127.0.0.1", "203.0.113.9", None) == "127.0.0.1"
    assert ip_of("127.0.0.1", "203.0.113.9", False) == "127.0.0.1"


def test_long_headers_are_walked_only_so_far():
    # 10,000 entries in trusted networks (only a client inside them could write those) cost MAX_HOPS looks
    many = ", ".join(["203.0.113.1"] + ["10.0.0.1"] * 10_000)
    assert ip_of("10.0.0.2", many, NETS) == "10.0.0.1"
    near = ", ".join(["203.0.113.1"] + ["10.0.0.1"] * (MAX_HOPS - 1))
    assert ip_of("10.0.0.2", near, NETS) == "203.0.113.1"


def test_config_trusted_proxies_are_validated_and_normalised():
    cfg = load_config_dict({"server": {"trusted_proxies": ["10.1.2.3/8", "192.168.0.1", "FD00::/8"]}})
    assert cfg.server.trusted_proxies == ["10.0.0.0/8", "192.168.0.1/32", "fd00::/8"]
    for bad in (["10.0.0.0/33"], ["proxy.internal"], "10.0.0.0/8"):
        with pytest.raises(ConfigError) as e:
            load_config_dict({"server": {"trusted_proxies": bad}})
        assert "trusted_proxies" in str(e.value)
