"""``server:`` -- the gateway's own HTTP server: bind address, server limits, workers, forwarded-for,
drain, and ``server.tls`` (docs/operations.md, docs/keys-and-limits.md)."""
from __future__ import annotations

import os

from pydantic import Field, field_validator, model_validator

from .base import Strict, parse_duration


DEFAULT_PORT = 7061


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("", "0", "false", "no", "off")


class TLSConfig(Strict):
    """``server.tls``: HTTPS on the gateway's own port.  Unset fields default from the environment:
    ``HTTPS_ENABLED`` (true/false), ``TLS_CERT_PATH``, ``TLS_KEY_PATH``."""
    enabled: bool | None = None
    cert_path: str | None = None  # PEM certificate (chain), server first
    key_path: str | None = None  # PEM private key (unencrypted)

    @model_validator(mode="after")
    def _from_env(self) -> "TLSConfig":
        if self.enabled is None:
            raw = os.environ.get("HTTPS_ENABLED", "").strip().lower()
            if raw not in _TRUE + _FALSE:
                raise ValueError(f"HTTPS_ENABLED must be true or false, not {raw!r}")
            self.enabled = raw in _TRUE
        if self.cert_path is None:
            self.cert_path = os.environ.get("TLS_CERT_PATH") or None
        if self.key_path is None:
            self.key_path = os.environ.get("TLS_KEY_PATH") or None
        if self.enabled and not (self.cert_path and self.key_path):
            raise ValueError("TLS is enabled (server.tls.enabled / HTTPS_ENABLED) but server.tls.cert_path "
                             "(TLS_CERT_PATH) and server.tls.key_path (TLS_KEY_PATH) are not both set")
        return self


class ServerConfig(Strict):
    host: str = "127.0.0.1"
    port: int = Field(default=DEFAULT_PORT, gt=0, lt=65536)
    max_body_bytes: int = Field(default=8 * 1024 * 1024, gt=0)
    # limits of the HTTP server itself (api/protocol.py), per worker; see docs/keys-and-limits.md
    max_header_bytes: int = Field(default=64 * 1024, ge=1024)  # request line + headers; beyond: 431
    max_headers: int = Field(default=100, ge=1)  # header fields per request; beyond: 431
    header_timeout: float = Field(default=10.0, gt=0)  # a request's head must arrive within this
    body_timeout: float = Field(default=30.0, gt=0)  # its body within this, once the head is in
    keep_alive_timeout: float = Field(default=5.0, gt=0)  # an idle keep-alive connection is closed after
    max_connections: int = Field(default=2048, ge=1)  # open connections per worker; beyond: 503 + close
    drain_timeout: float = Field(default=30.0, ge=0)  # on shutdown, how long running requests may finish
    _server_d = field_validator("header_timeout", "body_timeout", "keep_alive_timeout", "drain_timeout",
                                mode="before")(lambda v: parse_duration(v))
    workers: int = Field(default=1, ge=1)
    trust_forwarded_for: bool = False
    # networks of the reverse proxies in front of the gateway; X-Forwarded-For is read from the right
    # through them (see api/forwarded.py and docs/keys-and-limits.md); setting it turns the header on
    trusted_proxies: list[str] = Field(default_factory=list)
    # on SIGTERM, /readyz answers 503 for this long (requests are still served) before the drain begins
    drain_readiness_delay: float = Field(default=0.0, ge=0)
    _drain_delay_d = field_validator("drain_readiness_delay", mode="before")(lambda v: parse_duration(v))
    tls: TLSConfig = Field(default_factory=dict, validate_default=True)

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, v: list[str]) -> list[str]:
        from ..api.forwarded import parse_networks
        return [str(n) for n in parse_networks(v)]
