"""Config reload: SIGHUP and ``POST /admin/reload`` (admin role) re-read the config file the process was
started with, validate it fully, and apply it without dropping a request.  See docs/operations.md.

    load + validate  ->  diff  ->  apply (in a fixed order)

* **load + validate**: the file is parsed (YAML), validated (``config.load_config_dict``: the same strict
  models as at start-up) and checked by ``preflight.require_runtime``; the new provider objects are built.
  Any problem: nothing changes, one error line is logged, ``/health`` and
  ``helixagent_config_reloads_total{result="failure"}`` show it, and the API answers 422.
* **diff**: the sections that need a restart (:data:`RESTART_SECTIONS`, and the backend fields of
  ``cache``, ``rate_limits`` and ``logging`` in :data:`RESTART_FIELDS`) are *not* applied: the running
  values are kept, a warning names them, and they are reported as ``restart_required`` (in the answer
  and in ``/health``) until the process restarts or the file matches again.
* **apply**: every step is synchronous, so no request ever sees half a reload: providers (objects of
  unchanged entries are kept with their connection pools; health and breaker state is kept by name),
  the gateway's config, the router, the limits (counters live in the backend and are never reset), the
  cache settings (the entries survive), the feature flags, observability (metric label values, secrets
  the access log scrubs, tracing of new providers) and the log level.  A request already in flight
  finishes on the objects it started with: a provider object the new config no longer uses is closed
  only after ``routing.request_timeout_ms`` plus a minute.

Several workers (``--workers N``): SIGHUP to the supervisor is forwarded to every worker, each reloads
in-process; ``POST /admin/reload`` reloads the worker that serves it and then signals the supervisor,
which forwards the SIGHUP to every worker (the one that answered finds nothing changed).  The generation
is counted per worker process: 1 at start, +1 for each reload that changed the applied configuration.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import signal
import time
import weakref
from typing import TYPE_CHECKING, Any

import yaml

from .config import Config, ConfigError, interpolate, load_config_dict
from .errors import GatewayError
from .gateway_types import GatewayLike
from .providers.fleet import Fleet, build_fleet

if TYPE_CHECKING:
    from .api.http import Request

log = logging.getLogger("helixagent")

SUPERVISOR_ENV = "HELIXAGENT_SUPERVISOR_PID"  # set by api/server.py's supervisor for its workers
# top-level sections a running process cannot change
RESTART_SECTIONS = ("environment", "server", "http", "auth", "database", "encryption", "retention", "metrics",
                    "tracing", "redis",
                    "batches")  # the runner's concurrency, lease and poll interval, the routes: start-up only
# fields of live sections that need a restart (a new backend, connection pool, file or key namespace)
RESTART_FIELDS: dict[str, tuple[str, ...]] = {
    "cache": ("type", "max_size", "max_bytes", "redis_url", "key_prefix", "redis_timeout", "redis_pool_size",
              "redis_pool_timeout", "dedupe_across_instances", "flight_lease"),  # flights start with the process
    "rate_limits": ("backend", "redis_url", "redis_timeout", "redis_pool_size", "redis_pool_timeout",
                    "key_prefix"),
    "logging": ("format", "fields", "include_bodies", "file"),
    "routing": ("shared_health",),  # its Redis clients, key namespace and sync loop start with the process
}
LIVE_SECTIONS = ("providers", "routing", "rate_limits", "cache", "features", "logging", "ensembles")
RETIRE_GRACE = 60.0  # seconds past routing.request_timeout_ms before a replaced provider object is closed

_RELOADERS: "weakref.WeakSet[Reloader]" = weakref.WeakSet()
_TASKS: "set[asyncio.Task[None]]" = set()  # background reloads and closes: referenced until done


def _spawn(coro: Any, what: str) -> None:
    """Run ``coro`` in the background, held until it ends; a failure is logged (a bug), never lost."""
    t: asyncio.Task[None] = asyncio.ensure_future(coro)
    _TASKS.add(t)

    def done(t: asyncio.Task[None]) -> None:
        _TASKS.discard(t)
        if not t.cancelled() and t.exception() is not None:
            log.error("%s failed", what, exc_info=t.exception())
    t.add_done_callback(done)


def _iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _one_line(msg: str) -> str:
    return "; ".join(line.strip() for line in msg.splitlines() if line.strip())


def read_config(path: str | None) -> Config:
    """The config at ``path`` (None: the defaults), as at start-up; a ConfigError names the problem.  A
    YAML error is reported by position only: the offending line of the file could hold a secret."""
    if not path:
        return load_config_dict({}, "<defaults>")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise ConfigError(f"config file {path!r} cannot be read ({exc.strerror or exc})") from None
    try:
        data = yaml.safe_load(interpolate(text)) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise ConfigError(f"{path}: not valid YAML: {problem}{where}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of settings")
    return load_config_dict(data, path)


def split(running: Config, new: Config) -> tuple[Config, list[str]]:
    """``new`` with every setting that needs a restart replaced by the running value, and the names of
    those that differ (``server``, ``cache.type``, ...)."""
    restart: list[str] = []
    update: dict[str, Any] = {}
    for sec in RESTART_SECTIONS:
        if getattr(new, sec) != getattr(running, sec):
            restart.append(sec)
            update[sec] = getattr(running, sec)
    for sec, fields in RESTART_FIELDS.items():
        old_s, new_s = getattr(running, sec), getattr(new, sec)
        keep = {f: getattr(old_s, f) for f in fields if getattr(new_s, f) != getattr(old_s, f)}
        restart += [f"{sec}.{f}" for f in keep]
        if keep:
            update[sec] = new_s.model_copy(update=keep)
    return new.model_copy(update=update), restart


def changed_sections(old: Config, new: Config) -> list[str]:
    return [s for s in LIVE_SECTIONS if getattr(old, s) != getattr(new, s)]


class Reloader:
    """``gw.services["reload"]``: the config generation, the last result, and the reload itself."""

    def __init__(self, gw: GatewayLike):
        self.gw = gw
        self.generation = 1
        self.loaded_at = time.time()
        self.last: dict[str, Any] | None = None  # the last reload's result (None: none yet)
        self.restart_required: list[str] = []
        self._lock = asyncio.Lock()
        self._retired: list[tuple[float, Any]] = []  # (close at, provider object)
        self._closer: asyncio.TimerHandle | None = None

    @property
    def source(self) -> str:
        path = self.gw.config_path
        return "<in-process>" if path is None else path or "<defaults>"

    def status(self) -> dict[str, Any]:
        """The ``config`` object of ``/health``."""
        return {"generation": self.generation, "loaded_at": _iso(self.loaded_at), "source": self.source,
                "pid": os.getpid(), "last_reload": self.last, "restart_required": list(self.restart_required)}

    # -- reload --------------------------------------------------------------------------------------
    async def reload(self, trigger: str) -> dict[str, Any]:
        """Re-read the config file and apply it; raises ConfigError (nothing changed) when it is invalid."""
        path = self.gw.config_path
        if path is None:
            raise ConfigError("this gateway was not started from a config file (nothing to re-read)")
        async with self._lock:
            try:
                new = await asyncio.to_thread(self._load, path)
            except ConfigError as exc:
                self._failed(trigger, exc)
                raise
            return self._apply_validated(new, trigger)

    async def apply(self, new: Config, trigger: str = "api") -> dict[str, Any]:
        """Validate and apply an already loaded config (embedding, tests); raises ConfigError."""
        async with self._lock:
            try:
                from .preflight import require_runtime
                require_runtime(new, self.source)
            except ConfigError as exc:
                self._failed(trigger, exc)
                raise
            return self._apply_validated(new, trigger)

    def _load(self, path: str) -> Config:
        from .preflight import require_runtime
        new = read_config(path)
        require_runtime(new, path)
        return new

    def _failed(self, trigger: str, exc: ConfigError) -> None:
        msg = self.gw.secrets.scrub(_one_line(str(exc)))
        self.last = {"result": "failure", "at": _iso(time.time()), "trigger": trigger, "error": msg}
        log.error("config reload (%s) failed; keeping the running configuration (generation %d): %s",
                  trigger, self.generation, msg)
        m = self.gw.services.get("metrics")
        if m is not None:
            m.config_reloaded(False, self.generation)

    def _apply_validated(self, new: Config, trigger: str) -> dict[str, Any]:
        gw = self.gw
        old = gw.cfg
        effective, restart = split(old, new)
        if effective.cache.enabled and gw.services.get("cache") is None:
            # the cache stage is installed at start-up only: turning it on needs a restart
            restart.append("cache.enabled")
            effective = effective.model_copy(update={"cache": effective.cache.model_copy(update={"enabled": False})})
        changed = changed_sections(old, effective)
        old_fleet = gw.fleet
        try:
            fleet = build_fleet(effective, old.http, old_fleet) if "providers" in changed else old_fleet
        except (ConfigError, ValueError) as exc:
            err = exc if isinstance(exc, ConfigError) else ConfigError(str(exc))
            self._failed(trigger, err)
            raise err from None
        report: dict[str, Any] = {"object": "config.reload", "result": "success", "trigger": trigger,
                                  "source": self.source, "changed": changed, "restart_required": restart}
        if "providers" in changed:
            report["providers"] = _provider_diff(old_fleet, fleet)
        if changed:
            self._apply(old, effective, fleet, old_fleet)
            self.generation += 1
            self.loaded_at = time.time()
        self.restart_required = restart
        report["generation"] = self.generation
        self.last = {"result": "success", "at": _iso(time.time()), "trigger": trigger, "error": None}
        if changed:
            log.info("config reload (%s): applied generation %d from %s; changed: %s", trigger, self.generation,
                     self.source, ", ".join(changed))
        else:
            log.info("config reload (%s): %s unchanged (generation %d)", trigger, self.source, self.generation)
        if restart:
            log.warning("config reload (%s): not applied, these settings need a restart: %s", trigger,
                        ", ".join(restart))
        m = gw.services.get("metrics")
        if m is not None:
            m.config_reloaded(True, self.generation)
        return report

    def _apply(self, old: Config, cfg: Config, fleet: Fleet, old_fleet: Fleet) -> None:
        """The fixed order; synchronous (no request runs in between)."""
        gw = self.gw
        from .redaction import register_config
        register_config(cfg)  # new secrets are scrubbed before anything can log them
        gw.fleet = fleet
        gw.providers = fleet.providers
        gw.mock_fallback = fleet.mock_fallback
        gw.cfg = cfg
        gw.router.reconfigure(cfg, fleet.providers)
        limits = gw.services.get("limits")
        if limits is not None:
            limits.reconfigure(cfg)
        cache = gw.services.get("cache")
        if cache is not None:
            cache.reconfigure(cfg.cache)
        flags = gw.services.get("flags")
        if flags is not None:
            flags.reconfigure(cfg)
        obs = gw.services.get("observability")
        if obs is not None:
            obs.reconfigure(gw)
        if cfg.logging.level != old.logging.level:
            from .observability.logs import set_level
            set_level(cfg.logging.level)
        if fleet is not old_fleet:
            self._retire(old_fleet.retired_by(fleet), cfg)

    # -- replaced provider objects -------------------------------------------------------------------------
    def _retire(self, providers: list[Any], cfg: Config) -> None:
        if not providers:
            return
        at = time.monotonic() + cfg.routing.request_timeout_ms / 1000.0 + RETIRE_GRACE
        self._retired += [(at, p) for p in providers]
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # closed at shutdown
        if self._closer is None:
            self._closer = loop.call_later(max(0.0, at - time.monotonic()), self._close_due)

    def _close_due(self) -> None:
        self._closer = None
        now = time.monotonic()
        due = [p for at, p in self._retired if at <= now]
        self._retired = [(at, p) for at, p in self._retired if at > now]
        for p in due:
            _spawn(p.close(), f"closing the replaced provider object {getattr(p, 'name', '?')}")
        if self._retired:
            nxt = min(at for at, _ in self._retired)
            self._closer = asyncio.get_running_loop().call_later(max(0.0, nxt - now), self._close_due)

    async def close_retired(self) -> None:
        if self._closer is not None:
            self._closer.cancel()
            self._closer = None
        retired, self._retired = self._retired, []
        for _, p in retired:
            await p.close()


def _provider_diff(old: Fleet, new: Fleet) -> dict[str, list[str]]:
    added = [n for n in new.sources if n not in old.sources]
    removed = [n for n in old.sources if n not in new.sources]
    changed = [n for n in new.sources if n in old.sources and new.providers.get(n) is not old.providers.get(n)]
    return {"added": added, "removed": removed, "changed": changed}


# -- triggers ------------------------------------------------------------------------------------------------
def on_sighup() -> None:
    """SIGHUP in a serving process (api/server.py calls this on the event loop): reload every gateway."""
    for r in list(_RELOADERS):
        _spawn(_reload_quietly(r, "SIGHUP"), "config reload (SIGHUP)")


async def _reload_quietly(r: Reloader, trigger: str) -> None:
    try:
        await r.reload(trigger)
    except ConfigError:
        pass  # logged by the reloader; the old configuration keeps serving


def _supervisor_pid() -> int | None:
    raw = os.environ.get(SUPERVISOR_ENV)
    if raw and raw.isdigit() and int(raw) == os.getppid():
        return int(raw)
    return None


async def admin_reload(gw: GatewayLike, req: Request) -> None:
    from .api.http import send_json
    await gw.authorize(req, "admin")
    r: Reloader = gw.services["reload"]
    try:
        report = await r.reload("api")
    except ConfigError as exc:
        raise GatewayError(422, gw.secrets.scrub(_one_line(str(exc))), code="invalid_config") from None
    sup = _supervisor_pid()
    if sup is not None:  # the other workers: the supervisor forwards SIGHUP to every worker
        os.kill(sup, signal.SIGHUP)
        report["workers"] = "all"
    await send_json(req.send, 200, report, {"cache-control": "no-store"})


def install(gw: GatewayLike) -> None:
    r = Reloader(gw)
    gw.services["reload"] = r
    _RELOADERS.add(r)
    gw.route("POST", "/admin/reload", admin_reload)
