"""The record stage and the store service the gateway runs (writer, start-up migration, purge job)."""
from __future__ import annotations

import asyncio
import datetime as dt
import logging

from ..config import Config, ConfigError
from ..gateway_types import GatewayLike
from ..pipeline import RequestContext, Stage
from . import queries
from .crypto import Keyring, KeyError_
from .db import engine_for, is_sqlite
from .replica import ReadRouter
from .writer import RecordWriter

log = logging.getLogger("helixagent.store")


class RecordStage(Stage):
    """Outer stage entered early: its post-hook runs last and sees the final outcome (usage, cost, cache
    status, error, time to first token, streamed)."""

    name = "record"
    outer = True

    def __init__(self, writer: RecordWriter):
        self.record = writer.record

    async def post(self, ctx: RequestContext) -> None:
        self.record(ctx)


def keyring_for(cfg: Config) -> Keyring | None:
    try:
        return Keyring.from_config(cfg.encryption)
    except KeyError_ as exc:
        raise ConfigError(str(exc)) from None


def auto_migrate(cfg: Config) -> bool:
    am = cfg.database.auto_migrate
    return is_sqlite(cfg.database.url) if am is None else am


def _upgrade_if_behind(url: str) -> None:
    """``migrate.upgrade(url)``, but Alembic is imported only when the database is not already at the head
    (store/revision.py: a cheap SQLAlchemy read); at the head, upgrade would do nothing."""
    from .revision import at_head
    if at_head(url):
        return
    from . import migrate
    migrate.upgrade(url)


class RecordStore:
    def __init__(self, cfg: Config, keyring: Keyring | None = None):
        self.cfg = cfg
        self.keyring = keyring
        db = cfg.database
        self.engine = engine_for(db)
        # reports (GET /v1/usage) read from database.read_url when set; writes use self.engine
        self.reads = ReadRouter(self.engine, db)
        self.dialect = self.engine.dialect.name
        self.writer = RecordWriter(self.engine, db.spool_dir, keyring=keyring, batch_size=db.batch_size,
                                   queue_size=db.queue_size, flush_interval=db.flush_interval,
                                   retry_interval=db.retry_interval, fsync_interval=db.spool_fsync_interval,
                                   record_bodies=db.record_bodies)
        self._purge_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if auto_migrate(self.cfg):
            try:
                await asyncio.to_thread(_upgrade_if_behind, self.cfg.database.url)
            except Exception as exc:
                if is_sqlite(self.cfg.database.url):
                    raise RuntimeError(f"database.url: migrating the SQLite database failed: {exc}") from exc
                # PostgreSQL may be away at start: records are spooled and replayed once the table exists
                log.error("database migration at start-up failed (%s); records are spooled until the database "
                          "is reachable and migrated", str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        self.check_key_age()
        await self.writer.start()
        self._purge_task = asyncio.get_running_loop().create_task(self._purge_loop(), name="helixagent-purge")

    def check_key_age(self) -> None:
        kr = self.keyring
        if kr is None:
            return
        age = kr.active.age_days()
        limit = self.cfg.encryption.key_rotation_days
        if age is None:
            log.info("the age of encryption key %s is unknown (give it a created date, id:key:YYYY-MM-DD, or a "
                     "date in its id) so encryption.key_rotation_days cannot be checked", kr.active_id)
        elif age > limit:
            log.warning("the active encryption key %s is %d days old, more than encryption.key_rotation_days "
                        "(%d): add a new key (helixagent encryption generate-key) as the last entry and run "
                        "helixagent encryption rotate", kr.active_id, age, limit)

    async def stop(self) -> None:
        if self._purge_task is not None:
            self._purge_task.cancel()
            try:
                await self._purge_task
            except BaseException:  # noqa: BLE001 - shutdown: the cancelled purge task's end is not news
                pass
        await self.writer.close()
        await self.reads.close()
        await self.engine.dispose()

    async def _purge_loop(self) -> None:
        ret = self.cfg.retention
        delay = min(ret.purge_interval, 60.0)
        while True:
            await asyncio.sleep(delay)
            delay = ret.purge_interval
            cutoff = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=ret.days)
            try:
                n = await queries.purge(self.engine, cutoff, ret.batch_size, pause=0.01)
                if n:
                    log.info("retention: purged %d record(s) older than %d days", n, ret.days)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - periodic purge: logged, retried next period
                log.warning("retention purge failed: %s", str(exc).splitlines()[0] if str(exc) else exc)


def install(gw: GatewayLike) -> None:
    from ..api import usage_routes
    store = RecordStore(gw.cfg, keyring_for(gw.cfg))
    gw.services["records"] = store
    gw.add_stage(RecordStage(store.writer))
    gw.on_startup(store.start)
    gw.on_shutdown(store.stop)
    usage_routes.install(gw)
