"""The client's address behind reverse proxies: ``X-Forwarded-For`` read from the right.

Each proxy appends the address it received the request from, so only the entries written by proxies we
trust mean anything; whatever is further left was written by the client and can be forged.  The rule,
as nginx's ``real_ip_recursive on``:

* ``server.trusted_proxies: [CIDR, ...]``: when the immediate peer is in one of those networks, walk
  ``X-Forwarded-For`` from the right, skipping addresses that are themselves in those networks; the
  first one that is not is the client.  A peer outside them is the client (its header is ignored).  If
  every entry is a trusted proxy, the leftmost is the client; an entry that is not an IP address ends the
  walk at the last trusted hop (a broken or hostile header never yields a made-up address).
* ``server.trust_forwarded_for: true`` with no ``trusted_proxies``: the immediate peer is the one trusted
  proxy, so the client is the rightmost entry (the address that proxy appended).
* neither: the immediate peer is the client.

Hot path: the networks are parsed once at start-up, and each address string's verdict is memoised in a
bounded dict, so a request behind a proxy costs a header scan and one or two dict lookups.
"""
from __future__ import annotations

import ipaddress
from typing import Any, Iterable

MAX_HOPS = 16          # entries looked at, from the right (a header of 10,000 entries costs no more)
_MEMO_MAX = 4096

_Net = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(values: Iterable[str]) -> list[_Net]:
    """``10.0.0.0/8``, ``192.168.1.7`` (one host), ``fd00::/8`` -> networks; ValueError naming a bad one."""
    nets: list[_Net] = []
    for v in values:
        try:
            nets.append(ipaddress.ip_network(str(v).strip(), strict=False))
        except ValueError:
            raise ValueError(f"{v!r} is not an IP network (write e.g. 10.0.0.0/8, 192.168.1.7 or fd00::/8)") from None
    return nets


def _parse_addr(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """An X-Forwarded-For entry: ``1.2.3.4``, ``1.2.3.4:5678``, ``2001:db8::1``, ``[2001:db8::1]:443``."""
    t = text.strip()
    if not t or len(t) > 64:
        return None
    if t[0] == "[":
        end = t.find("]")
        if end < 0:
            return None
        t = t[1:end]
    elif t.count(":") == 1:  # IPv4 with a port
        t = t.partition(":")[0]
    try:
        a = ipaddress.ip_address(t)
    except ValueError:
        return None
    if a.version == 6:
        if a.scope_id:
            return None
        m = a.ipv4_mapped
        if m is not None:
            return m
    return a


class ForwardedFor:
    """Resolves the client address of a request from its peer and its X-Forwarded-For headers."""

    __slots__ = ("nets", "_memo")

    def __init__(self, trusted: Iterable[str] | None = None):
        # empty: only the immediate peer is trusted (the rightmost entry is the client)
        self.nets = parse_networks(trusted or ())
        self._memo: dict[str, tuple[str, bool] | None] = {}

    def _verdict(self, text: str) -> tuple[str, bool] | None:
        """(canonical address, is a trusted proxy) or None when ``text`` is not an address."""
        memo = self._memo
        v = memo.get(text, False)
        if v is not False:
            return v  # type: ignore[return-value]
        a = _parse_addr(text)
        if a is None:
            v = None
        else:
            v = (str(a), any(a.version == n.version and a in n for n in self.nets))
        if len(memo) >= _MEMO_MAX:
            memo.clear()
        memo[text] = v
        return v

    def client(self, peer: str, headers: Iterable[tuple[bytes, bytes]]) -> str:
        """The client address; ``headers`` are the ASGI scope's (every X-Forwarded-For line counts, in order)."""
        if self.nets:
            p = self._verdict(peer)
            if p is None or not p[1]:
                return peer  # not from a trusted proxy: its X-Forwarded-For is the client's own writing
        values = [v for k, v in headers if k == b"x-forwarded-for" or k.lower() == b"x-forwarded-for"]
        if not values:
            return peer
        entries = b",".join(values).decode("latin-1").rsplit(",", MAX_HOPS)
        if len(entries) > MAX_HOPS:
            entries = entries[1:]  # the unsplit rest, further left than anything we look at
        if not self.nets:
            v = self._verdict(entries[-1])
            return v[0] if v is not None else peer
        found = peer
        for e in reversed(entries):
            v = self._verdict(e)
            if v is None:
                break
            found = v[0]
            if not v[1]:
                break
        return found


def for_server(server: Any) -> ForwardedFor | None:
    """The resolver the ``server:`` config asks for, or None when the peer is the client."""
    trusted = list(getattr(server, "trusted_proxies", None) or ())
    if trusted:
        return ForwardedFor(trusted)
    if getattr(server, "trust_forwarded_for", False):
        return ForwardedFor(())
    return None
