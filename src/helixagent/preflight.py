"""Start-up checks beyond the schema: everything ``serve`` would refuse, found before it starts.

``check_runtime(cfg)`` is the one list of these checks; ``helixagent config check`` prints its problems
and ``helixagent serve`` (and :func:`helixagent.app.create_app`) refuse to start on any, so the two can
never disagree.  The checks are static (nothing is connected to): encryption keys present and
well-formed when encryption is enabled, files and directories the gateway must read or create, URLs that
parse (``database.url``, every Redis URL, each provider's ``base_url``), and outside development at
least one provider that can answer (see :data:`DEV_ENVIRONMENTS` and docs/providers.md).

Also here: :func:`describe_database`, the line every database CLI command prints to stderr so the user
sees which database it acts on.
"""
from __future__ import annotations

import os
import sys
from urllib.parse import urlsplit

from .config import Config, ConfigError
from .redaction import mask_url

# Environments in which a config with no usable provider is served by mock stand-ins (deterministic
# text, labelled `mock`).  Any other environment refuses to start without a provider that can answer.
DEV_ENVIRONMENTS = frozenset({"development", "dev", "test"})

_VENDOR_KEY_ENV = {"openai": "OPENAI_API_KEY", "deepseek": "DEEPSEEK_API_KEY",
                   "anthropic": "ANTHROPIC_API_KEY", "gemini": "GEMINI_API_KEY"}


def is_development(cfg: Config) -> bool:
    return cfg.environment.strip().lower() in DEV_ENVIRONMENTS


def usable_providers(cfg: Config) -> list[str]:
    """Enabled providers that can answer: a key, or a type that needs none (openai_compatible, mock)."""
    from .providers import is_configured
    return [pc.name for pc in cfg.providers if pc.enabled and is_configured(pc)]


def no_provider_problem(cfg: Config) -> str | None:
    """Outside development, no provider that can answer is a refusal (not a silent mock)."""
    if is_development(cfg) or usable_providers(cfg):
        return None
    enabled = [pc for pc in cfg.providers if pc.enabled]
    if enabled:
        need = ", ".join(f"{pc.name} ({_VENDOR_KEY_ENV.get(pc.type or '', 'providers[].api_key')})"
                         for pc in enabled)
        what = f"no configured provider has an API key: {need}"
    else:
        what = "no provider is configured"
    return (f"providers: environment {cfg.environment!r}: {what}. Set the key(s), or add a provider with "
            "`type: mock` to serve the built-in mock explicitly (stand-ins for keyless providers are only "
            f"served in {', '.join(sorted(DEV_ENVIRONMENTS))})")


def _check_redis_url(where: str, url: str | None, out: list[str]) -> None:
    if not url:
        return
    try:
        from .redis_client import parse_url  # every kind: redis, rediss, redis+sentinel, redis+cluster
        parse_url(url)
    except (ValueError, TypeError) as exc:
        out.append(f"{where}: {mask_url(url)!r} is not a Redis URL ({exc})")


def _check_http_url(where: str, url: str | None, out: list[str]) -> None:
    if not url:
        return
    try:
        u = urlsplit(url)
        _ = u.port  # raises on a bad port
    except ValueError as exc:
        out.append(f"{where}: {mask_url(url)!r} does not parse ({exc})")
        return
    if u.scheme not in ("http", "https") or not u.hostname:
        out.append(f"{where}: {mask_url(url)!r} is not an http(s):// URL with a host")


def _check_database_url(url: str, out: list[str], key: str = "database.url") -> bool:
    """True when the URL parses and names a supported database."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    from .store.db import async_url
    try:
        make_url(url)
    except (ArgumentError, ValueError) as exc:
        out.append(f"{key}: {mask_url(url)!r} does not parse ({type(exc).__name__}; write e.g. "
                   "sqlite:///./helixagent.db or postgresql://user:password@host:5432/db)")
        return False
    try:
        async_url(url)
    except ValueError as exc:  # unsupported backend: the message names database.url
        out.append(f"{str(exc).replace('database.url', key)} (got {mask_url(url)!r})")
        return False
    return True


def _nearest_existing(path: str) -> str:
    p = os.path.abspath(path)
    while not os.path.exists(p):
        parent = os.path.dirname(p)
        if parent == p:
            break
        p = parent
    return p


def _check_dir_creatable(where: str, path: str, out: list[str]) -> None:
    """A directory the gateway creates (or writes into) at start-up."""
    if os.path.isdir(path):
        if not os.access(path, os.W_OK | os.X_OK):
            out.append(f"{where}: directory {path!r} is not writable by this user")
        return
    if os.path.exists(path):
        out.append(f"{where}: {path!r} exists and is not a directory")
        return
    base = _nearest_existing(path)
    if not os.path.isdir(base):
        out.append(f"{where}: cannot create {path!r}: {base!r} is not a directory")
    elif not os.access(base, os.W_OK | os.X_OK):
        out.append(f"{where}: cannot create {path!r}: {base!r} is not writable by this user")


def _check_file_writable(where: str, path: str, out: list[str]) -> None:
    if os.path.isdir(path):
        out.append(f"{where}: {path!r} is a directory")
    elif os.path.exists(path):
        if not os.access(path, os.W_OK):
            out.append(f"{where}: {path!r} is not writable by this user")
    else:
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            out.append(f"{where}: directory {parent!r} does not exist")
        elif not os.access(parent, os.W_OK | os.X_OK):
            out.append(f"{where}: cannot create {path!r}: {parent!r} is not writable by this user")


def check_runtime(cfg: Config, env: dict[str, str] | None = None) -> list[str]:
    """Every problem that would stop the gateway from starting (or from working at all), one line each.
    An empty list means ``serve`` starts with this config."""
    out: list[str] = []
    p = no_provider_problem(cfg)
    if p:
        out.append(p)
    for i, pc in enumerate(cfg.providers):
        _check_http_url(f"providers[{i}].base_url ({pc.name})", pc.base_url, out)
    # encryption keys: present and well-formed (the same parser the record writer uses)
    if cfg.encryption.enabled:
        from .store.crypto import Keyring, KeyError_
        try:
            Keyring.from_config(cfg.encryption, env)
        except KeyError_ as exc:
            out.append(f"encryption: {exc}")
    # URLs that must parse
    db_ok = _check_database_url(cfg.database.url, out)
    if cfg.database.read_url:
        _check_database_url(cfg.database.read_url, out, "database.read_url")
    _check_redis_url("redis.url", cfg.redis.url, out)
    if cfg.cache.enabled and cfg.cache.type == "redis":
        _check_redis_url("cache.redis_url", cfg.cache.redis_url, out)
    if cfg.rate_limits.backend == "redis":
        _check_redis_url("rate_limits.redis_url", cfg.rate_limits.redis_url, out)
    _check_redis_url("auth.redis_url", cfg.auth.redis_url, out)
    _check_redis_url("routing.shared_health.redis_url", cfg.routing.shared_health.redis_url, out)
    # files and directories
    _check_dir_creatable("database.spool_dir", cfg.database.spool_dir, out)
    if db_ok:
        from .store.db import is_sqlite, sqlite_path
        if is_sqlite(cfg.database.url):
            path = sqlite_path(cfg.database.url)
            if path:
                _check_file_writable("database.url (SQLite file)", path, out)
    if cfg.logging.file:
        _check_file_writable("logging.file", cfg.logging.file, out)
    if cfg.server.tls.enabled:
        _check_tls(cfg, out)
    return out


def _check_tls(cfg: Config, out: list[str]) -> None:
    """server.tls: the certificate and key exist, are readable and load as a pair (the key is never shown)."""
    import ssl
    tls = cfg.server.tls
    ok = True
    for where, path in (("server.tls.cert_path (TLS_CERT_PATH)", tls.cert_path),
                        ("server.tls.key_path (TLS_KEY_PATH)", tls.key_path)):
        if not path:
            out.append(f"{where}: not set, and TLS is enabled")
            ok = False
            continue
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            out.append(f"{where}: {path!r} cannot be read ({exc.strerror or exc})")
            ok = False
    if ok:
        assert tls.cert_path and tls.key_path
        try:
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
                tls.cert_path, tls.key_path, password=lambda: b"")  # never an interactive prompt
        except ssl.SSLError as exc:
            out.append(f"server.tls: {tls.cert_path!r} and {tls.key_path!r} are not a PEM certificate and its "
                       f"unencrypted private key ({exc.reason or 'unreadable'})")


def require_runtime(cfg: Config, source: str = "<config>") -> None:
    """Raise :class:`ConfigError` listing every problem :func:`check_runtime` finds."""
    problems = check_runtime(cfg)
    if problems:
        raise ConfigError(f"{source}: the gateway cannot start with this configuration:\n"
                          + "\n".join(f"  {p}" for p in problems))


def refuse(cfg: Config, source: str) -> int:
    """For the CLI: print the problems to stderr; 2 when there are any, else 0."""
    try:
        require_runtime(cfg, source)
    except ConfigError as exc:
        print(f"helixagent: {exc}", file=sys.stderr)
        return 2
    return 0


# -- which database a CLI command acts on -------------------------------------------------------------


def describe_database(url: str, config_source: str | None) -> str:
    """``database: <url, password masked> [(<absolute SQLite path>)] (from <config>)``."""
    shown = mask_url(url)
    from sqlalchemy.exc import ArgumentError

    from .store.db import is_sqlite, sqlite_path
    try:
        path = sqlite_path(url) if is_sqlite(url) else None
    except ArgumentError:  # an unparsable URL is shown as given; the command itself reports the error
        path = None
    if path and not os.path.isabs(path):
        shown += f" ({os.path.abspath(path)})"
    origin = f"from {config_source}" if config_source else (
        "built-in default: no --config and no $HELIXAGENT_CONFIG")
    return f"# database: {shown} ({origin})"


def config_source(path: str | None) -> str | None:
    """Where a CLI command's config comes from: --config, else $HELIXAGENT_CONFIG, else None (defaults)."""
    if path:
        return path
    env = os.environ.get("HELIXAGENT_CONFIG")
    return f"$HELIXAGENT_CONFIG={env}" if env else None


def announce_database(url: str, config_path: str | None) -> None:
    print(describe_database(url, config_source(config_path)), file=sys.stderr)


__all__ = ["DEV_ENVIRONMENTS", "announce_database", "check_runtime", "describe_database", "is_development",
           "mask_url", "no_provider_problem", "refuse", "require_runtime", "usable_providers"]
