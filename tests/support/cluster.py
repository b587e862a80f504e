"""Several `helixagent serve` processes behind a real nginx, sharing one PostgreSQL and one Redis.

This is the multi-instance harness of tests/test_scale_out*.py::

    with Cluster(tmp_path, providers=[fake.provider()], db_url=..., redis_url=...) as c:
        httpx.post(c.url + "/v1/chat/completions", ...)      # through nginx (least_conn)
        c.kill(1); c.restart(1)                              # SIGKILL instance 1, start it again
        c.term(2)                                            # SIGTERM (readiness-first drain)
        c.records()                                          # completion rows in the shared database

* Every instance is its own ``helixagent serve`` subprocess on its own loopback port, with one config
  file (written by the harness from a dict) and its own record spool directory (kept across a restart, so
  a killed instance replays its journal when it starts again, as a pod restarted in place does).
* PostgreSQL: the caller passes a URL (a per-test schema, see support.pg.fresh_schema); the harness runs
  ``helixagent migrate up`` once before the instances start, as the compose file's migrate step does.
* Redis: the caller passes the URL; every Redis key of the cluster is under one unique ``prefix``
  (rate limits, key bus, cache), deleted by :meth:`Cluster.close`.
* nginx: Debian's ``/usr/sbin/nginx`` in the foreground (``daemon off``) with a temporary prefix, pid,
  temp paths and logs under the test's tmp dir, running the shipped deploy/compose/nginx.conf adapted by
  :func:`nginx_conf` (least_conn, HTTP/1.1 with keepalive, no buffering, ``proxy_next_upstream error
  timeout``, which never replays a POST that was already sent to an instance).  The access log
  (``nginx-access.log``) records, per request, the client's X-Request-ID, the status and every upstream
  tried (``$upstream_addr`` / ``$upstream_status``): :meth:`Cluster.nginx_log` parses it.
* Processes are started in their own session and killed (the whole group) on :meth:`close`, which the
  context manager and the ``make_cluster`` fixture always call, at interpreter exit as a last resort, and
  by the kernel if the test process dies (``setpriv --pdeathsig``); a failed test leaves no process behind.

Hooks for the shared-state tests (tests/test_scale_out_shared.py): :meth:`Cluster.instance_url` talks to
one instance directly (bypassing nginx), :meth:`Cluster.each` runs a request against every instance,
:meth:`Cluster.metrics` reads one instance's /metrics.
"""
from __future__ import annotations

import atexit
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx
import pytest
import yaml

from fakes.openai_upstream import FakeOpenAI
from support.keys import redis_cleanup, unique_prefix
from support.pg import fresh_schema
from support.servers import free_port, wait_until

SRC = str(Path(__file__).resolve().parents[2] / "src")
NGINX = "/usr/sbin/nginx"
MASTER = "cluster-master-key-0123456789"

# The proxy under test is the shipped deploy/compose/nginx.conf itself, adapted by :func:`nginx_conf`: its
# one ``server gateway:7061 <params>;`` line becomes one line per instance with the same parameters, it
# listens on a loopback port, runs one worker in the foreground with pid, temp paths and logs under the
# test's directory, and logs each request.  What that file sets and the tests check:
# * least_conn over the instances, HTTP/1.1 with upstream keepalive, no buffering (SSE);
# * ``proxy_next_upstream error timeout``: a request is passed to the next instance only when connecting
#   to one failed (refused, timed out) or it failed before a response head -- and, since nginx 1.9.13,
#   never a POST that was already sent to an instance (that would need ``non_idempotent``, not set: the
#   instance may already have called the provider and recorded it).  A SIGKILLed instance costs at most
#   the requests it was running (502, or a stream cut at the client); new ones go to the others;
# * upstream ``keepalive_timeout`` below the gateway's ``server.keep_alive_timeout`` (5 s).
COMPOSE_NGINX = Path(__file__).resolve().parents[2] / "deploy" / "compose" / "nginx.conf"
_LOG_FORMAT = "log_format helix '$http_x_request_id $status \"$upstream_addr\" \"$upstream_status\" $request_time';"


def nginx_conf(prefix: Path, port: int, addrs: list[str], source: Path = COMPOSE_NGINX) -> str:
    """deploy/compose/nginx.conf for these instance addresses (see above); every edit must apply."""
    conf = source.read_text()

    def sub(pattern: str, repl: Any, what: str) -> None:
        nonlocal conf
        conf, n = re.subn(pattern, repl, conf, count=1, flags=re.M)
        if n != 1:
            raise AssertionError(f"{source}: cannot adapt {what} (pattern {pattern!r} not found)")

    sub(r"^\s*server\s+gateway:7061\b([^;]*);",
        lambda m: "\n".join(f"        server {a}{m[1]};" for a in addrs), "the upstream server line")
    sub(r"^(\s*)listen\s+80;", lambda m: f"{m[1]}listen 127.0.0.1:{port};", "the listen port")
    sub(r"^worker_processes\s+\S+;", "worker_processes 1;", "worker_processes")
    sub(r"^(\s*)access_log\s+off;", lambda m: (
        f"{m[1]}{_LOG_FORMAT}\n{m[1]}access_log {prefix}/nginx-access.log helix;\n"
        + "".join(f"{m[1]}{k}_temp_path {prefix}/{k};\n" for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))),
        "the access log")
    head = (f"pid {prefix}/nginx.pid;\nerror_log {prefix}/nginx-error.log warn;\ndaemon off;\n"
            + ("user root;\n" if os.geteuid() == 0 else ""))
    return head + conf


_LIVE: set[subprocess.Popen[bytes]] = set()
# Children are started from one long-lived thread, under util-linux's ``setpriv --pdeathsig``: the kernel
# signals them when that thread ends, so even a test process that is itself SIGKILLed (a CI timeout)
# leaves no gateway or nginx behind (the death signal follows the thread that forked, hence one thread
# for every start, restarts from worker threads included).  Without setpriv, only close() and atexit.
_SPAWNER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cluster-spawner")
_SETPRIV = shutil.which("setpriv")


def _popen(argv: list[str], death_signal: str = "KILL", **kw: Any) -> subprocess.Popen[bytes]:
    if _SETPRIV:
        argv = [_SETPRIV, f"--pdeathsig={death_signal}", "--", *argv]
    proc: subprocess.Popen[bytes] = _SPAWNER.submit(subprocess.Popen, argv, start_new_session=True, **kw).result()
    _LIVE.add(proc)
    return proc


def _reap_all() -> None:  # last resort at interpreter exit (the fixtures close the cluster first)
    for p in list(_LIVE):
        _kill_group(p)


atexit.register(_reap_all)


def _kill_group(proc: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
    _LIVE.discard(proc)


@dataclass
class Instance:
    index: int
    port: int
    spool: Path
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    overrides: dict[str, Any] = field(default_factory=dict)   # merged over the cluster's config
    starts: int = 0
    exits: list[int] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@dataclass
class NginxEntry:
    request_id: str
    status: int
    upstreams: list[str]        # every instance nginx tried, in order ("127.0.0.1:port")
    upstream_statuses: list[str]


class Cluster:
    """N gateway processes + nginx; see the module docstring.  ``config`` is merged over the base config
    (providers, shared PostgreSQL/Redis, redis rate limits and cache, master key); ``instance_config[i]``
    over that for instance ``i`` alone."""

    def __init__(self, tmp: Path, *, providers: list[dict[str, Any]], db_url: str, redis_url: str,
                 n: int = 3, config: dict[str, Any] | None = None, prefix: str | None = None,
                 migrate: bool = True, instance_config: dict[int, dict[str, Any]] | None = None) -> None:
        self.tmp = Path(tmp)
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.db_url = db_url
        self.redis_url = redis_url
        self.prefix = prefix or unique_prefix()
        self.master = MASTER
        self.instances = [Instance(i, free_port(), self.tmp / f"spool-{i}", self.tmp / f"gw-{i}.log")
                          for i in range(n)]
        for i, extra in (instance_config or {}).items():
            self.instances[i].overrides = extra
        self.nginx_port = free_port()
        self.nginx_proc: subprocess.Popen[bytes] | None = None
        self.cfg = self._config(providers, config or {})
        self.cfg_path = self.tmp / "cluster.yaml"
        self.cfg_path.write_text(yaml.safe_dump(self.cfg, sort_keys=False))
        try:
            if migrate:
                self._migrate()
            for inst in self.instances:
                self._spawn(inst)
            for inst in self.instances:
                self.wait_ready(inst.index)
            self._start_nginx()
        except BaseException:
            self.close()
            raise

    # -- configuration ------------------------------------------------------------------------------
    def _config(self, providers: list[dict[str, Any]], extra: dict[str, Any]) -> dict[str, Any]:
        p = self.prefix
        base: dict[str, Any] = {
            "environment": "test",
            "providers": providers,
            "auth": {"master_key": MASTER, "redis_prefix": p},
            "redis": {"url": self.redis_url},
            "rate_limits": {"backend": "redis", "key_prefix": p},
            "cache": {"enabled": False, "type": "redis", "key_prefix": f"{p}:cache:"},
            "database": {"url": self.db_url, "auto_migrate": False, "flush_interval": "20ms",
                         "pool_size": 4},
            "logging": {"level": "warning"},
            # behind nginx on loopback: X-Forwarded-For comes from it
            "server": {"trusted_proxies": ["127.0.0.1/32"], "drain_timeout": "20s"},
        }
        return _merge(base, extra)

    def _env(self) -> dict[str, str]:
        env = dict(os.environ, PYTHONPATH=SRC)
        for k in ("HELIXAGENT_API_KEY", "HELIXAGENT_CONFIG", "HTTPS_ENABLED", "TLS_CERT_PATH", "TLS_KEY_PATH"):
            env.pop(k, None)
        return env

    def _migrate(self) -> None:
        out = subprocess.run([sys.executable, "-m", "helixagent", "migrate", "up", "-c", str(self.cfg_path)],
                             env=self._env(), capture_output=True, timeout=120)
        if out.returncode != 0:
            raise RuntimeError(f"migrate up failed: {out.stdout.decode()[-2000:]} {out.stderr.decode()[-2000:]}")

    # -- instances ------------------------------------------------------------------------------------
    def _spawn(self, inst: Instance) -> None:
        # each instance its own spool (kept across restarts: the journal of a killed one is replayed)
        env = self._env()
        cfg_path = self.tmp / f"cluster-{inst.index}.yaml"
        cfg = _merge(_merge(self.cfg, inst.overrides), {"database": {"spool_dir": str(inst.spool)}})
        cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        with open(inst.log, "ab") as log:
            log.write(f"--- start {inst.starts} at {time.time():.3f}\n".encode())
            log.flush()
            inst.proc = _popen(
                [sys.executable, "-m", "helixagent", "serve", "-c", str(cfg_path), "--port", str(inst.port)],
                env=env, stdout=log, stderr=subprocess.STDOUT)
        inst.starts += 1

    def wait_ready(self, i: int, timeout: float = 45) -> None:
        inst = self.instances[i]

        def ready() -> bool:
            if inst.proc is None or inst.proc.poll() is not None:
                raise RuntimeError(f"instance {i} exited: {self.log_tail(i)}")
            try:
                return httpx.get(inst.url + "/readyz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False
        if not wait_until(ready, timeout=timeout, interval=0.1):
            raise RuntimeError(f"instance {i} not ready in {timeout}s: {self.log_tail(i)}")

    def kill(self, i: int) -> None:
        """SIGKILL instance ``i`` (no drain, no flush: what the journal holds is all that survives)."""
        inst = self.instances[i]
        assert inst.proc is not None
        inst.proc.send_signal(signal.SIGKILL)
        inst.exits.append(inst.proc.wait(10))
        _LIVE.discard(inst.proc)

    def term(self, i: int) -> None:
        """SIGTERM instance ``i`` (readiness fails, then the drain); :meth:`wait_exit` waits for the end."""
        inst = self.instances[i]
        assert inst.proc is not None
        inst.proc.send_signal(signal.SIGTERM)

    def wait_exit(self, i: int, timeout: float = 60) -> int:
        inst = self.instances[i]
        assert inst.proc is not None
        rc = inst.proc.wait(timeout)
        inst.exits.append(rc)
        _LIVE.discard(inst.proc)
        return rc

    def restart(self, i: int, wait: bool = True, config: dict[str, Any] | None = None) -> None:
        """Start instance ``i`` again on its port, with its spool (killing it first if it still runs);
        ``config`` replaces its own overrides of the cluster's config."""
        inst = self.instances[i]
        if config is not None:
            inst.overrides = config
        if inst.alive():
            self.kill(i)
        self._spawn(inst)
        if wait:
            self.wait_ready(i)

    def log_tail(self, i: int, n: int = 3000) -> str:
        p = self.instances[i].log
        return p.read_text(errors="replace")[-n:] if p.exists() else ""

    # -- nginx ----------------------------------------------------------------------------------------
    def _start_nginx(self) -> None:
        if not os.path.exists(NGINX):
            raise RuntimeError(f"{NGINX} is missing: run scripts/test-setup.sh (Debian's nginx package)")
        prefix = self.tmp / "nginx"
        prefix.mkdir(exist_ok=True)
        conf = nginx_conf(prefix, self.nginx_port, [inst.addr for inst in self.instances])
        (prefix / "nginx.conf").write_text(conf)
        self.nginx_conf = prefix / "nginx.conf"
        err = open(prefix / "nginx-stderr.log", "ab")
        try:
            # nginx's master is told TERM (it then stops its worker), not KILL (which would orphan the worker)
            self.nginx_proc = _popen([NGINX, "-p", str(prefix), "-c", str(self.nginx_conf)], death_signal="TERM",
                                     stdout=err, stderr=subprocess.STDOUT)
        finally:
            err.close()

        def up() -> bool:
            if self.nginx_proc is None or self.nginx_proc.poll() is not None:
                raise RuntimeError("nginx exited: " + (prefix / "nginx-stderr.log").read_text()[-2000:]
                                   + (prefix / "nginx-error.log").read_text()[-2000:]
                                   if (prefix / "nginx-error.log").exists() else "")
            try:
                return httpx.get(self.url + "/nginx-health", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False
        if not wait_until(up, timeout=15, interval=0.05):
            raise RuntimeError("nginx did not start")

    @property
    def url(self) -> str:
        """nginx, in front of every instance."""
        return f"http://127.0.0.1:{self.nginx_port}"

    def nginx_log(self) -> list[NginxEntry]:
        path = self.tmp / "nginx" / "nginx-access.log"
        out = []
        for line in path.read_text().splitlines() if path.exists() else []:
            m = re.match(r'(\S+) (\d+) "([^"]*)" "([^"]*)"', line)
            if m:
                out.append(NginxEntry(m[1], int(m[2]), _split_upstreams(m[3]), _split_upstreams(m[4])))
        return out

    def nginx_errors(self) -> str:
        path = self.tmp / "nginx" / "nginx-error.log"
        return path.read_text(errors="replace") if path.exists() else ""

    # -- hooks for tests ------------------------------------------------------------------------------
    def instance_url(self, i: int) -> str:
        """One instance directly, bypassing nginx."""
        return self.instances[i].url

    def each(self, fn: Callable[[str], Any]) -> list[Any]:
        """``fn(instance_url)`` for every instance, in order."""
        return [fn(inst.url) for inst in self.instances]

    def metrics(self, i: int) -> str:
        return httpx.get(self.instances[i].url + "/metrics", timeout=5).text

    def auth(self, key: str | None = None) -> dict[str, str]:
        return {"authorization": f"Bearer {key or self.master}"}

    def create_key(self, **body: Any) -> dict[str, Any]:
        """A virtual key through nginx (admin API, master key)."""
        body.setdefault("role", "user")
        r = httpx.post(self.url + "/admin/keys", json=body, headers=self.auth(), timeout=10)
        assert r.status_code == 201, r.text
        return dict(r.json())

    def records(self, where: str = "", params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """Rows of the shared ``completions`` table (request_id, client_request_id, status, streamed,
        outcome, provider)."""
        import psycopg2
        import psycopg2.extras
        dsn, schema = _pg_dsn(self.db_url)
        conn = psycopg2.connect(dsn)
        try:
            with conn.cursor(cursor_factory=psycopg2.extras.RealDictCursor) as cur:
                if schema:
                    cur.execute(f'SET search_path TO "{schema}"')
                cur.execute("SELECT request_id, client_request_id, status, streamed, outcome, provider "
                            "FROM completions " + where, params or {})
                return [dict(r) for r in cur.fetchall()]
        finally:
            conn.close()

    # -- teardown -------------------------------------------------------------------------------------
    def close(self) -> None:
        for inst in self.instances:
            if inst.proc is not None:
                _kill_group(inst.proc)
        if self.nginx_proc is not None:
            _kill_group(self.nginx_proc, signal.SIGQUIT)
            _kill_group(self.nginx_proc)
        redis_cleanup(self.redis_url, self.prefix)

    def __enter__(self) -> "Cluster":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _split_upstreams(v: str) -> list[str]:
    """nginx joins the upstreams tried with ", " (and groups with " : ")."""
    return [u.strip() for u in re.split(r", | : ", v) if u.strip() and u.strip() != "-"]


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _pg_dsn(url: str) -> tuple[str, str | None]:
    """support.pg.schema_url's URL -> (plain DSN, schema)."""
    m = re.search(r"[?&]options=-csearch_path%3D([A-Za-z0-9_]+)", url)
    dsn = url.replace("postgresql+psycopg2://", "postgresql://")
    if not m:
        return dsn, None
    dsn = re.sub(r"[?&]options=-csearch_path%3D[A-Za-z0-9_]+", "", dsn)
    return dsn, m[1]



# -- fixtures (a test module uses them with ``pytest_plugins = ("support.cluster",)``) ----------------
def _need(kind: str) -> str:
    import conftest  # tests/conftest.py: the CI URL, or a private server outside CI
    return str(conftest.need_postgres() if kind == "postgres" else conftest.need_redis())


@pytest.fixture
def pg_schema() -> Iterator[str]:
    """A fresh PostgreSQL schema on the CI server, dropped afterwards."""
    yield from fresh_schema(_need("postgres"))


@pytest.fixture
def upstream() -> Iterator[FakeOpenAI]:
    fake = FakeOpenAI(words=6)
    yield fake
    fake.close()


@pytest.fixture
def two_upstreams() -> Iterator[tuple[FakeOpenAI, FakeOpenAI]]:
    """Two fake OpenAI upstreams (a primary and its fallback, or two providers)."""
    a, b = FakeOpenAI(), FakeOpenAI()
    yield a, b
    a.close()
    b.close()


@pytest.fixture
def make_cluster(tmp_path: Path, pg_schema: str) -> Iterator[Any]:
    """``make_cluster(providers, config=...)`` -> a started :class:`Cluster`; always closed after the test."""
    started: list[Cluster] = []

    def make(providers: list[dict[str, Any]], **kw: Any) -> Cluster:
        c = Cluster(tmp_path / f"cluster-{len(started)}", providers=providers, db_url=pg_schema,
                    redis_url=_need("redis"), **kw)
        started.append(c)
        return c

    try:
        yield make
    finally:
        for c in started:
            c.close()
