"""``helixagent keys ...``: manage virtual keys directly in the database of the config
(``--config`` or ``$HELIXAGENT_CONFIG``).  When Redis is configured, running gateways are told about the
change and have dropped their cached copy by the time the command returns."""
from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import sys
from typing import Any, Awaitable, Callable

from ..config import ConfigError, load_config, parse_duration


def _duration(v: str) -> float:
    try:
        d = parse_duration(v)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if d < 0:
        raise argparse.ArgumentTypeError("must not be negative")
    return d


def install(sub: Any) -> None:
    k = sub.add_parser("keys", help="manage virtual API keys (create, list, rotate, revoke)")
    ksub = k.add_subparsers(dest="keys_command", metavar="ACTION")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", "-c", help="YAML config file (default: $HELIXAGENT_CONFIG or built-in defaults)")
        p.add_argument("--json", action="store_true", help="print JSON")

    c = ksub.add_parser("create", help="create a key; the secret is printed once")
    c.add_argument("--user", help="user id the key belongs to")
    c.add_argument("--app", help="application the key belongs to")
    c.add_argument("--role", choices=["admin", "user", "readonly"], default="user")
    c.add_argument("--expires", type=_duration, help="lifetime, e.g. 30d, 12h")
    c.add_argument("--rpm", type=int, help="requests per minute (overrides rate_limits.api_key)")
    c.add_argument("--tpm", type=int, help="tokens per minute (overrides rate_limits.api_key)")
    c.add_argument("--tpd", type=int, help="tokens per day for this key")
    c.add_argument("--cost-per-day", type=float, help="dollars per day for this key")
    c.add_argument("--cost-per-month", type=float, help="dollars per month for this key")
    c.add_argument("--priority", choices=["high", "normal", "low"],
                   help="queue priority of requests that send no x-helixagent-priority header")
    c.add_argument("--max-priority", choices=["high", "normal", "low"], help="highest priority the key may ask for")
    c.add_argument("--queue-weight", type=float, help="the key's weight in the provider queues' fair share")
    common(c)
    c.set_defaults(func=lambda a: _run(_create, a))

    ls = ksub.add_parser("list", help="list keys (never their secrets)")
    ls.add_argument("--user")
    ls.add_argument("--app")
    common(ls)
    ls.set_defaults(func=lambda a: _run(_list, a))

    r = ksub.add_parser("rotate", help="issue a replacement; the old key works until the grace period ends")
    r.add_argument("id")
    r.add_argument("--grace", type=_duration, default=24 * 3600.0, help="grace period for the old key (default 24h)")
    common(r)
    r.set_defaults(func=lambda a: _run(_rotate, a))

    v = ksub.add_parser("revoke", help="revoke a key at once")
    v.add_argument("id")
    common(v)
    v.set_defaults(func=lambda a: _run(_revoke, a))
    k.set_defaults(func=lambda a: (k.print_help(), 2)[1])


def _run(fn: Any, args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        print(f"helixagent: {exc}", file=sys.stderr)
        return 2
    from ..errors import GatewayError
    try:
        return asyncio.run(_with_store(fn, cfg, args))
    except GatewayError as exc:
        print(f"helixagent: {exc.message}", file=sys.stderr)
        return 1


async def _with_store(fn: Callable[..., Awaitable[int]], cfg: Any, args: argparse.Namespace) -> int:
    from ..preflight import announce_database
    from ..store.db import make_engine
    from .keys import KeyStore
    announce_database(cfg.database.url, args.config)
    engine = make_engine(cfg.database.url)
    try:
        store = KeyStore(engine)
        if not await store.has_table():
            from ..store.record import auto_migrate
            if not auto_migrate(cfg):
                print("helixagent: the api_keys table does not exist: run `helixagent migrate up` first",
                      file=sys.stderr)
                return 1
            import asyncio

            from ..store import migrate
            await asyncio.to_thread(migrate.upgrade, cfg.database.url)
        return await fn(cfg, store, args)
    finally:
        await engine.dispose()


async def _notify(cfg: Any, ids: list[str]) -> None:
    from . import auth_redis_url
    url = auth_redis_url(cfg)
    if not url:
        return
    from .bus import publish_url
    try:
        n, acks = await publish_url(url, cfg.auth.redis_prefix, ids)
        if n:
            print(f"# {acks} of {n} running gateway instance(s) acknowledged the change", file=sys.stderr)
    except Exception as exc:  # noqa: BLE001 - CLI: the failure is printed, the key change itself is done
        print(f"helixagent: could not notify running gateways through Redis ({type(exc).__name__}); they pick "
              f"the change up within auth.key_cache_ttl", file=sys.stderr)


def _show(rec: Any, args: argparse.Namespace, secret: str | None = None) -> None:
    d = rec.public()
    if secret:
        d["key"] = secret
    if args.json:
        print(json.dumps(d, indent=2))
        return
    for k, val in d.items():
        if val is None or val == {}:
            continue
        print(f"{k:13} {json.dumps(val) if isinstance(val, dict) else val}")


async def _create(cfg: Any, store: Any, args: argparse.Namespace) -> int:
    limits: dict[str, Any] = {}
    for name, attr in (("requests_per_minute", "rpm"), ("tokens_per_minute", "tpm"), ("tokens_per_day", "tpd"),
                       ("cost_per_day", "cost_per_day"), ("cost_per_month", "cost_per_month"),
                       ("priority", "priority"), ("max_priority", "max_priority"), ("queue_weight", "queue_weight")):
        v = getattr(args, attr)
        if v is not None:
            limits[name] = v
    expires = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=args.expires) if args.expires else None
    rec, secret = await store.create(user_id=args.user, application=args.app, role=args.role,
                                     expires_at=expires, limits=limits)
    _show(rec, args, secret)
    if not args.json:
        print("# the key is shown only now; store it safely", file=sys.stderr)
    await _notify(cfg, [rec.id])
    return 0


async def _list(cfg: Any, store: Any, args: argparse.Namespace) -> int:
    recs = await store.list(user_id=args.user, application=args.app)
    if args.json:
        print(json.dumps([r.public() for r in recs], indent=2))
        return 0
    print(f"{'ID':22} {'PREFIX':12} {'ROLE':9} {'STATUS':9} {'USER':16} {'APP':16} EXPIRES")
    for r in recs:
        d = r.public()
        print(f"{d['id']:22} {d['prefix']:12} {d['role']:9} {d['status']:9} {str(d['user_id'] or '-'):16} "
              f"{str(d['application'] or '-'):16} {d['expires_at'] or '-'}")
    return 0


async def _rotate(cfg: Any, store: Any, args: argparse.Namespace) -> int:
    new, secret, old = await store.rotate(args.id, args.grace)
    _show(new, args, secret)
    if not args.json:
        print(f"# {old.id} keeps working until {old.grace_until.isoformat() if old.grace_until else '-'}",
              file=sys.stderr)
    await _notify(cfg, [old.id, new.id])
    return 0


async def _revoke(cfg: Any, store: Any, args: argparse.Namespace) -> int:
    rec = await store.revoke(args.id)
    _show(rec, args)
    await _notify(cfg, [rec.id])
    return 0
