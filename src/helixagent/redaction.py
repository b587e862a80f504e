"""Every secret the gateway was configured with, and the one function that scrubs them out of text.

Built from the config at start-up (:func:`register_config`, called when the gateway is built) and used
wherever text that did not come from us leaves the process or is stored: upstream error messages relayed
to clients and kept in records (``providers/base.py``), the access log, and every log record.

What counts as a secret: every provider's ``api_key`` (also one taken from the environment), the master
key, the values of ``providers[].headers`` (an ``Authorization`` or ``x-api-key`` header set there is as
secret as an api_key), the encryption keys, and the passwords in the database, Redis and provider URLs.
Besides those exact values, anything shaped like an API key (``sk-...``, ``AIza...``, ``hx-...``,
``Bearer ...``) is scrubbed too.  Values shorter than :data:`MIN_LENGTH` are not searched for (too short
to tell apart from ordinary text, too short to be a real secret).

The registry of a process only grows: several gateways in one process (tests, embedding) share it, so
each scrubs the secrets of all of them.
"""
from __future__ import annotations

import base64
import re
import threading
from typing import Any, Iterable
from urllib.parse import quote, unquote, urlsplit

MIN_LENGTH = 6
MASK = "****"

# anything key-shaped, configured or not (a key of another tenant, of another vendor)
KEYLIKE = (r"sk-[A-Za-z0-9_\-]{6,}|sk-ant-[A-Za-z0-9_\-]{6,}|AIza[0-9A-Za-z_\-]{20,}|hk-[A-Za-z0-9_\-]{6,}|"
           r"hx-[A-Za-z0-9_\-]{6,}|(?i:bearer)\s+[A-Za-z0-9_\-\.=+/]{6,}")


_QUERY_PASSWORD = re.compile(r"[?&][A-Za-z_]*password=([^&#]+)")
_USERINFO_PASSWORD = re.compile(r"://([^:/@]*):([^@]*)@")
_QUERY_PASSWORD_SUB = re.compile(r"([?&][A-Za-z_]*password=)[^&#]*")


def mask_url(url: str) -> str:
    """The URL as it may be shown (logs, errors, ``config check``): the userinfo password and every
    ``*password=`` query value replaced by ``****``; a string with an ``@`` but no ``scheme://`` keeps only
    what follows the ``@``."""
    shown = _QUERY_PASSWORD_SUB.sub(r"\1****", _USERINFO_PASSWORD.sub(r"://\1:****@", url))
    if "://" not in shown and "@" in shown:
        return "****@" + shown.rpartition("@")[2]
    return shown


def url_password(url: str | None) -> str | None:
    """The password in ``scheme://user:password@host/...`` (None when there is none)."""
    if not url or "@" not in url:
        return None
    try:
        pw = urlsplit(url).password
    except ValueError:
        return None
    return pw or None


def url_secrets(url: str | None) -> list[str]:
    """Every secret a URL carries: the userinfo password and ``*password=`` query values (Redis
    ``?sentinel_password=``, ``ssl_password=``), URL-decoded as the client will send them."""
    if not url:
        return []
    out = [url_password(url)]
    for m in _QUERY_PASSWORD.finditer(url):
        out.extend((m.group(1), unquote(m.group(1))))
    return [s for s in dict.fromkeys(out) if s]


def config_secrets(cfg: Any) -> list[str]:
    """The secret values in a :class:`~helixagent.config.Config`."""
    out: list[str | None] = [cfg.auth.master_key]
    for p in cfg.providers:
        out.append(p.api_key)
        out.extend(str(v) for v in (p.headers or {}).values())
        out.append(url_password(p.base_url))
    for url in (cfg.database.url, cfg.database.read_url, cfg.redis.url, cfg.cache.redis_url,
                cfg.rate_limits.redis_url, cfg.auth.redis_url, cfg.routing.shared_health.redis_url):
        out.extend(url_secrets(url))
    out.extend(encryption_secrets(cfg))
    return [s for s in out if s]


def encryption_secrets(cfg: Any) -> list[str]:
    """The configured record-encryption keys, as written (base64) -- when encryption is on."""
    if not cfg.encryption.enabled:
        return []
    from .store.crypto import KeyError_, Keyring
    try:
        ring = Keyring.from_config(cfg.encryption)
    except KeyError_:
        return []  # a broken key configuration stops the records' start-up with its own message
    if ring is None:
        return []
    return [base64.b64encode(k.material).decode() for k in ring.keys.values()]


class SecretRegistry:
    """The secrets to scrub, compiled into one regular expression (longest first, so a secret that
    contains another is replaced whole)."""

    def __init__(self) -> None:
        self._values: set[str] = set()
        self._lock = threading.Lock()
        self._pattern = re.compile(KEYLIKE)

    def add(self, values: Iterable[str | None]) -> None:
        new: set[str] = set()
        for v in values:
            if not v or len(v) < MIN_LENGTH:
                continue
            new.add(v)
            for variant in (quote(v, safe=""), unquote(v)):  # as it may be echoed in a URL
                if len(variant) >= MIN_LENGTH:
                    new.add(variant)
        with self._lock:
            if new <= self._values:
                return
            self._values |= new
            alts = sorted(self._values, key=len, reverse=True)
            self._pattern = re.compile("|".join([re.escape(v) for v in alts] + [KEYLIKE]))

    def values(self) -> list[str]:
        return sorted(self._values, key=len, reverse=True)

    def scrub(self, text: str) -> str:
        return self._pattern.sub(MASK, text)

    def scrub_any(self, value: Any) -> Any:
        """``scrub`` for a str; a dict or list scrubbed through (keys and values); anything else as is."""
        if isinstance(value, str):
            return self._pattern.sub(MASK, value)
        if isinstance(value, dict):
            return {self.scrub_any(k): self.scrub_any(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self.scrub_any(v) for v in value]
        return value


REGISTRY = SecretRegistry()


def register_config(cfg: Any) -> SecretRegistry:
    """Add a config's secrets to the process's registry (at start-up); installs the log filter."""
    REGISTRY.add(config_secrets(cfg))
    install_log_filter()
    return REGISTRY


def scrub(text: str) -> str:
    return REGISTRY.scrub(text)


# -- logs --------------------------------------------------------------------------------------------------

_factory_installed = False


def install_log_filter() -> None:
    """Scrub every log record of the process as it is created (message, arguments, exception text), so no
    handler -- ours, uvicorn's, a test's -- ever sees a configured secret."""
    global _factory_installed
    import logging
    with REGISTRY._lock:
        if _factory_installed:
            return
        _factory_installed = True
    previous = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        _scrub_record(record)
        return record

    logging.setLogRecordFactory(factory)


def _scrub_record(record: Any) -> None:
    pattern = REGISTRY._pattern
    msg = record.msg
    if isinstance(msg, str):
        record.msg = pattern.sub(MASK, msg)
    args = record.args
    if args:
        if isinstance(args, dict):
            record.args = {k: _scrub_arg(v) for k, v in args.items()}
        elif isinstance(args, tuple):
            record.args = tuple(_scrub_arg(a) for a in args)
    exc = record.exc_info
    if exc and exc[1] is not None and not record.exc_text:
        import traceback
        text = "".join(traceback.format_exception(*exc)).rstrip("\n")
        clean = pattern.sub(MASK, text)
        if clean != text:
            record.exc_text = clean  # formatters use exc_text when set


def _scrub_arg(a: Any) -> Any:
    if isinstance(a, (int, float)) or a is None:
        return a
    if isinstance(a, str):
        return REGISTRY._pattern.sub(MASK, a)
    if isinstance(a, BaseException) or not isinstance(a, (bytes, bytearray)):
        try:
            s = str(a)
        except Exception:  # noqa: BLE001 -- an object whose __str__ fails: logging would show that error
            return a
        clean = REGISTRY._pattern.sub(MASK, s)
        return clean if clean != s else a
    return a
