"""CLI: ``helixagent migrate up|status|down N``, ``purge``, ``usage``, ``encryption rotate|generate-key|status``,
``records show ID``."""
from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import re
import sys
from collections.abc import Sequence
from typing import Any

import orjson

from ..config import Config, ConfigError, load_config


def _cfg(args: argparse.Namespace) -> Config:
    return load_config(getattr(args, "config", None))


def _url(args: argparse.Namespace) -> str:
    return getattr(args, "database_url", None) or _cfg(args).database.url


def _err(msg: str) -> int:
    print(f"helixagent: {msg}", file=sys.stderr)
    return 1


def _first_line(exc: BaseException) -> str:
    s = str(exc)
    return s.splitlines()[0] if s else type(exc).__name__


def _run(fn: Any) -> Any:
    def wrapper(args: argparse.Namespace) -> int:
        try:
            return int(fn(args) or 0)
        except ConfigError as exc:
            print(f"helixagent: {exc}", file=sys.stderr)
            return 2
        except ValueError as exc:
            return _err(str(exc))
        except Exception as exc:  # noqa: BLE001 - CLI: one clear line and exit 1, not a traceback
            return _err(f"{type(exc).__name__}: {_first_line(exc)}")
    return wrapper


# -- migrate ---------------------------------------------------------------------------------------------
def cmd_migrate(args: argparse.Namespace) -> int:
    from . import migrate
    url = _url(args)
    if args.action == "up":
        migrate.upgrade(url, args.revision)
        print(f"migrated to {migrate.current(url)}")
    elif args.action == "down":
        migrate.downgrade(url, args.steps)
        print(f"migrated down {args.steps} step(s); now at {migrate.current(url) or 'base (empty)'}")
    else:
        st = migrate.status(url)
        print(f"current: {st['current'] or 'base (no migrations applied)'}")
        print(f"head:    {st['head']}")
        if st["pending"]:
            print("pending: " + ", ".join(st["pending"]))
        else:
            print("up to date" if st["up_to_date"] else "the database is at a revision this version does not know")
        return 0 if st["up_to_date"] else 3
    return 0


# -- purge -----------------------------------------------------------------------------------------------
# A purge age always carries its unit: a bare number (is 90 seconds or days?) and `m` (minutes or months?)
# are refused.  A month is 30 days, a year 365.
_AGE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")
_AGE_UNITS = {
    "s": 1.0, "sec": 1.0, "secs": 1.0, "second": 1.0, "seconds": 1.0,
    "min": 60.0, "mins": 60.0, "minute": 60.0, "minutes": 60.0,
    "h": 3600.0, "hour": 3600.0, "hours": 3600.0,
    "d": 86400.0, "day": 86400.0, "days": 86400.0,
    "w": 7 * 86400.0, "week": 7 * 86400.0, "weeks": 7 * 86400.0,
    "mo": 30 * 86400.0, "month": 30 * 86400.0, "months": 30 * 86400.0,
    "y": 365 * 86400.0, "year": 365 * 86400.0, "years": 365 * 86400.0,
}


def parse_age(value: str, option: str = "--older-than") -> float:
    """``90d`` -> seconds.  The unit is required; ``m`` is refused as ambiguous (``min`` or ``mo``)."""
    m = _AGE_RE.match(value)
    if not m:
        raise ValueError(f"{option} {value!r}: write a number and a unit, e.g. 90d, 12h, 3mo")
    unit = m.group(2).lower()
    if not unit:
        raise ValueError(f"{option} {value!r}: give a unit (90d = 90 days, 12h, 30min, 3mo = 3 months, 1y); "
                         "a bare number is refused because it deletes records")
    if unit == "m":
        raise ValueError(f"{option} {value!r}: 'm' is ambiguous: write {m.group(1)}min for minutes or "
                         f"{m.group(1)}mo for months")
    factor = _AGE_UNITS.get(unit)
    if factor is None:
        raise ValueError(f"{option} {value!r}: unknown unit {m.group(2)!r} (use s, min, h, d, w, mo, y)")
    seconds = float(m.group(1)) * factor
    if seconds <= 0:
        raise ValueError(f"{option} must be positive (e.g. 90d)")
    return seconds


def cmd_purge(args: argparse.Namespace) -> int:
    from ..preflight import announce_database
    from . import queries
    from .db import engine_for
    cfg = _cfg(args)
    if args.older_than:
        seconds = parse_age(args.older_than)
        age = args.older_than.strip()
    else:
        seconds = cfg.retention.days * 86400.0
        age = f"{cfg.retention.days}d (retention.days)"
    cutoff = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=seconds)
    when = cutoff.isoformat(timespec="seconds")
    batch = args.batch_size or cfg.retention.batch_size
    url = args.database_url or cfg.database.url
    announce_database(url, getattr(args, "config", None))

    async def count() -> int:
        eng = engine_for(cfg.database, url)
        try:
            return await queries.count_older(eng, cutoff)
        finally:
            await eng.dispose()

    n = asyncio.run(count())
    if args.dry_run or n == 0:
        print(f"{'would delete' if args.dry_run else 'nothing to delete:'} {n} record(s) created before {when} "
              f"(older than {age})")
        return 0
    print(f"will delete {n} record(s) created before {when} (older than {age})", file=sys.stderr)
    if not args.yes:
        if not sys.stdin.isatty():
            return _err("refusing to delete without confirmation: stdin is not a terminal; pass --yes")
        print(f"delete {n} record(s)? [y/N] ", end="", file=sys.stderr, flush=True)
        answer = sys.stdin.readline().strip().lower()
        if answer not in ("y", "yes"):
            return _err("not confirmed; nothing deleted")

    async def go() -> int:
        eng = engine_for(cfg.database, url)
        try:
            return await queries.purge(eng, cutoff, batch)
        finally:
            await eng.dispose()

    deleted = asyncio.run(go())
    print(f"deleted {deleted} record(s) created before {when}")
    return 0


# -- usage -----------------------------------------------------------------------------------------------
def format_table(result: dict[str, Any]) -> str:
    head = [result["group_by"], "requests", "errors", "prompt_tokens", "completion_tokens", "total_tokens",
            "cost", "cache_hits"]
    rows = [[str(d["group"]) if d["group"] is not None else "-", *(str(d[k]) for k in head[1:6]),
             f"{d['cost']:.6f}", str(d["cache_hits"])] for d in result["data"]]
    t = result["total"]
    rows.append(["TOTAL", *(str(t[k]) for k in head[1:6]), f"{t['cost']:.6f}", str(t["cache_hits"])])
    widths = [max(len(head[i]), *(len(r[i]) for r in rows)) for i in range(len(head))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(widths[0]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(cells))
    out = [f"usage from {result['from']} to {result['to']}", line(head), line(["-" * w for w in widths])]
    out += [line(r) for r in rows[:-1]]
    out.append(line(["-" * w for w in widths]))
    out.append(line(rows[-1]))
    return "\n".join(out)


def cmd_usage(args: argparse.Namespace) -> int:
    from . import queries
    from .db import engine_for
    cfg = _cfg(args)
    now = dt.datetime.now(dt.timezone.utc)
    end = queries.parse_time(args.to, "--to", end=True) if args.to else now
    start = queries.parse_time(args.from_, "--from") if args.from_ else end - dt.timedelta(days=30)
    if start >= end:
        raise ValueError("--from must be before --to")

    url = args.database_url or cfg.database.url
    # the report reads from the replica: --read-url, else database.read_url unless --database-url points
    # the command at another database (then that one is read)
    read_url = args.read_url or (None if args.database_url else cfg.database.read_url)
    from ..preflight import announce_database, mask_url
    from .replica import FALLBACK, ReadRouter
    announce_database(url, getattr(args, "config", None))
    db = cfg.database.model_copy(update={"url": url, "read_url": read_url})

    async def go() -> tuple[dict[str, Any], str]:
        eng = engine_for(db, url)
        reads = ReadRouter(eng, db)
        try:
            return await reads.read(lambda e: queries.usage(e, start, end, args.group_by, user_id=args.user,
                                                            application=args.application))
        finally:
            await reads.close()
            await eng.dispose()

    result, source = asyncio.run(go())
    if read_url:
        note = (" (the read replica is unavailable; read from the primary)" if source == FALLBACK
                else f" ({mask_url(read_url)})")
        print(f"read from: {source}{note}", file=sys.stderr)
    if args.json:
        print(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())
    else:
        print(format_table(result))
    return 0


# -- encryption ------------------------------------------------------------------------------------------
def cmd_generate_key(args: argparse.Namespace) -> int:
    from .crypto import generate_key_entry
    print(generate_key_entry())
    return 0


def cmd_rotate(args: argparse.Namespace) -> int:
    from . import queries
    from .db import engine_for
    from .record import keyring_for
    cfg = _cfg(args)
    kr = keyring_for(cfg)
    if kr is None:
        raise ValueError("encryption.enabled is false: enable it and configure keys before rotating")

    async def go() -> dict[str, Any]:
        eng = engine_for(cfg.database, args.database_url or cfg.database.url)
        try:
            return await queries.rotate(eng, kr, args.batch_size,
                                        progress=lambda n: print(f"  re-encrypted {n} record(s)...",
                                                                 file=sys.stderr))
        finally:
            await eng.dispose()

    res = asyncio.run(go())
    print(f"re-encrypted {res['reencrypted']} record(s) to key {res['active_key']}")
    if res["failed"]:
        print(f"{len(res['failed'])} record(s) could NOT be re-encrypted and were left unchanged:", file=sys.stderr)
        for rid, why in res["failed"][:50]:
            print(f"  {rid}: {why}", file=sys.stderr)
        return 1
    return 0


def cmd_enc_status(args: argparse.Namespace) -> int:
    from sqlalchemy import func, select

    from .db import engine_for
    from .record import keyring_for
    from .schema import completions as C
    cfg = _cfg(args)
    kr = keyring_for(cfg)
    if kr is None:
        print("encryption: disabled")
    else:
        age = kr.active.age_days()
        print(f"active key: {kr.active_id} (age: {'unknown' if age is None else f'{age} days'}; "
              f"rotate every {cfg.encryption.key_rotation_days} days)")
        print("configured keys: " + ", ".join(kr.keys))

    async def go() -> Sequence[Any]:
        eng = engine_for(cfg.database, args.database_url or cfg.database.url)
        try:
            async with eng.connect() as conn:
                return (await conn.execute(select(C.c.enc_key_id, func.count()).group_by(C.c.enc_key_id))).all()
        finally:
            await eng.dispose()

    for kid, n in asyncio.run(go()):
        print(f"  {kid or '(clear)'}: {n} record(s)")
    return 0


# -- records ---------------------------------------------------------------------------------------------
def cmd_show(args: argparse.Namespace) -> int:
    from . import queries
    from .db import engine_for
    from .record import keyring_for
    cfg = _cfg(args)
    kr = keyring_for(cfg)

    async def go() -> Any:
        eng = engine_for(cfg.database, args.database_url or cfg.database.url)
        try:
            return await queries.get_record(eng, kr, args.request_id)
        finally:
            await eng.dispose()

    rec = asyncio.run(go())
    if rec is None:
        return _err(f"no record {args.request_id!r}")
    out: dict[str, Any] = {}
    for k, v in rec.items():
        k = str(k)  # SQLAlchemy's quoted_name, a str subclass orjson refuses as a key
        if isinstance(v, (bytes, bytearray, memoryview)):
            try:
                v = orjson.loads(bytes(v))
            except orjson.JSONDecodeError:
                v = bytes(v).decode("utf-8", "replace")
        elif isinstance(v, dt.datetime):
            v = v.isoformat()
        out[k] = v
    print(orjson.dumps(out, option=orjson.OPT_INDENT_2).decode())
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="YAML config file (default: $HELIXAGENT_CONFIG or built-in defaults)")
    p.add_argument("--database-url", help="override database.url")


def install_commands(sub: Any) -> None:
    m = sub.add_parser("migrate", help="database schema migrations")
    msub = m.add_subparsers(dest="action", metavar="ACTION", required=True)
    up = msub.add_parser("up", help="apply all pending migrations")
    up.add_argument("revision", nargs="?", default="head")
    _common(up)
    st = msub.add_parser("status", help="show the current and pending migrations (exit 3 if not up to date)")
    _common(st)
    dn = msub.add_parser("down", help="revert the last N migrations")
    dn.add_argument("steps", type=int, nargs="?", default=1, metavar="N")
    _common(dn)
    for p in (up, st, dn):
        p.set_defaults(func=_run(cmd_migrate))

    pg = sub.add_parser("purge", help="delete completion records older than a duration (default retention.days)")
    pg.add_argument("--older-than", help="age with a unit: 90d, 12h, 30min, 3mo (months), 1y; default retention.days")
    pg.add_argument("--batch-size", type=int, default=None)
    pg.add_argument("--dry-run", action="store_true", help="only count")
    pg.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")
    _common(pg)
    pg.set_defaults(func=_run(cmd_purge))

    us = sub.add_parser("usage", help="tokens, requests, errors and cost per group")
    us.add_argument("--from", dest="from_", help="start (2025-01-01, ISO time or Unix seconds; default 30 days ago)")
    us.add_argument("--to", help="end (a date includes that whole day; default now)")
    us.add_argument("--group-by", default="day", choices=["day", "provider", "model", "user", "application"])
    us.add_argument("--user", help="only this user id")
    us.add_argument("--application", help="only this application")
    us.add_argument("--json", action="store_true", help="print JSON (the /v1/usage shape)")
    _common(us)
    us.add_argument("--read-url", help="read the report from this database (a replica); default database.read_url, "
                                       "or --database-url when that is given")
    us.set_defaults(func=_run(cmd_usage))

    en = sub.add_parser("encryption", help="encryption keys")
    esub = en.add_subparsers(dest="enc_action", metavar="ACTION", required=True)
    ro = esub.add_parser("rotate", help="re-encrypt every record not under the active key")
    ro.add_argument("--batch-size", type=int, default=500)
    _common(ro)
    ro.set_defaults(func=_run(cmd_rotate))
    gk = esub.add_parser("generate-key", help="print a new key entry (id:base64key) for HELIXAGENT_ENCRYPTION_KEYS")
    gk.set_defaults(func=_run(cmd_generate_key))
    es = esub.add_parser("status", help="active key, its age, and records per key")
    _common(es)
    es.set_defaults(func=_run(cmd_enc_status))

    rc = sub.add_parser("records", help="completion records")
    rsub = rc.add_subparsers(dest="rec_action", metavar="ACTION", required=True)
    sh = rsub.add_parser("show", help="print one record with its bodies decrypted")
    sh.add_argument("request_id")
    _common(sh)
    sh.set_defaults(func=_run(cmd_show))
