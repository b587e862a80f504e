"""Shared fixtures: fake upstreams and a gateway over real HTTP."""
from __future__ import annotations

import os
import subprocess
from typing import Any, Callable, Iterator

import pytest

from fakes.openai_upstream import FakeOpenAI
from support.servers import GatewayServer

POSTGRES_URL = os.environ.get("HELIX_TEST_POSTGRES_URL")
REDIS_URL = os.environ.get("HELIX_TEST_REDIS_URL")
IN_CI = bool(os.environ.get("CI"))


def _compiled_modules() -> list[str]:
    """The suite runs against whatever imports: the sources, or (``make test-compiled``, which sets
    HELIX_EXPECT_COMPILED=1) every module of helixagent.compiled.MODULES compiled -- checked, so that run
    cannot quietly test the sources instead; a compiled module older than its source stops the run."""
    from helixagent import compiled
    names = compiled.check()
    if os.environ.get("HELIX_EXPECT_COMPILED") == "1" and sorted(names) != sorted(compiled.MODULES):
        missing = sorted(set(compiled.MODULES) - set(names))
        raise pytest.UsageError(f"HELIX_EXPECT_COMPILED=1 but these modules are not compiled: {missing}")
    return names


_COMPILED = _compiled_modules()


def pytest_report_header(config: Any) -> str:
    return f"helixagent compiled modules: {len(_COMPILED)} ({', '.join(_COMPILED) or 'none: the sources'})"



# Outside CI, a test session that was given no URL starts its own private server the first time a test
# needs one (PostgreSQL: initdb + pg_ctl on a free port; Redis: redis-server on a free port), exports the
# URL for the gateways it starts, and stops it at the end; so `make test` on a fresh machine runs every
# test.  Only when the server binaries are missing is such a test skipped, naming what to install.
_PRIVATE: dict[str, Any] = {}


def _private(kind: str) -> str:
    got = _PRIVATE.get(kind)
    if got is None:
        try:
            if kind == "postgres":
                from support.pg import PrivatePostgres
                got = PrivatePostgres()
            else:
                from support.redis_server import PrivateRedis
                got = PrivateRedis()
        except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
            got = exc
        _PRIVATE[kind] = got
        if not isinstance(got, Exception):
            os.environ["HELIX_TEST_POSTGRES_URL" if kind == "postgres" else "HELIX_TEST_REDIS_URL"] = got.url
    if isinstance(got, Exception):
        pytest.skip(f"no HELIX_TEST_{kind.upper()}_URL and a private {kind} server could not start: {got}")
    return str(got.url)


def pytest_unconfigure(config: Any) -> None:
    for srv in _PRIVATE.values():
        if not isinstance(srv, Exception):
            srv.close()
    _PRIVATE.clear()


def need_postgres() -> str:
    """The PostgreSQL URL for real-server tests.  Missing in CI is a failure, not a skip; elsewhere a
    private server is started for the session."""
    if not POSTGRES_URL:
        if IN_CI:
            pytest.fail("HELIX_TEST_POSTGRES_URL is not set in CI")
        return _private("postgres")
    return POSTGRES_URL


def need_redis() -> str:
    if not REDIS_URL:
        if IN_CI:
            pytest.fail("HELIX_TEST_REDIS_URL is not set in CI")
        return _private("redis")
    return REDIS_URL


@pytest.fixture(scope="session")
def fake_openai_session() -> Iterator[FakeOpenAI]:
    fake = FakeOpenAI()
    yield fake
    fake.close()


@pytest.fixture
def fake_openai(fake_openai_session: FakeOpenAI) -> Iterator[FakeOpenAI]:
    fake_openai_session.reset()
    yield fake_openai_session
    fake_openai_session.reset()


@pytest.fixture(scope="session")
def fakes() -> Iterator[tuple[Any, Any, Any]]:
    """One fake upstream per vendor wire format (OpenAI, Anthropic, Gemini), shared by the session; tests
    reset them before use (a module may define its own ``fakes`` of another shape)."""
    from fakes.anthropic_upstream import FakeAnthropic
    from fakes.gemini_upstream import FakeGemini
    fs = (FakeOpenAI(), FakeAnthropic(), FakeGemini())
    yield fs
    for f in fs:
        f.close()


@pytest.fixture(autouse=True)
def _no_log_handler_left_behind() -> Iterator[None]:
    """A test that runs the CLI in process (``configure_logging``) leaves the root handler writing to that
    test's captured stderr, which pytest closes after it: every later log line of the session -- the fakes'
    access lines, an in-process gateway's access log -- then failed with "--- Logging error ---" (I/O on a
    closed file) in the output.  Each test ends with that handler removed (tests that configure logging
    themselves remove it too; twice is harmless)."""
    yield
    from helixagent.observability.logs import reset_logging
    reset_logging()


@pytest.fixture
def make_gateway(tmp_path: Any) -> Iterator[Callable[..., GatewayServer]]:
    """``make_gateway(config_dict)`` starts a gateway on a free port; all are stopped after the test.
    The database defaults to a SQLite file in the test's tmp dir."""
    started: list[GatewayServer] = []

    def make(cfg: dict[str, Any] | None = None, **kw: Any) -> GatewayServer:
        cfg = dict(cfg or {})
        db = dict(cfg.get("database") or {})
        db.setdefault("url", f"sqlite:///{tmp_path}/helix-{len(started)}.db")
        db.setdefault("spool_dir", str(tmp_path / f"spool-{len(started)}"))
        cfg["database"] = db
        gw = GatewayServer(cfg, **kw)
        started.append(gw)
        return gw

    yield make
    for gw in started:
        gw.close()


@pytest.fixture
def gateway(make_gateway: Callable[..., GatewayServer], fake_openai: FakeOpenAI) -> GatewayServer:
    """A gateway with one OpenAI provider pointing at the fake upstream."""
    return make_gateway({"providers": [fake_openai.provider()]})
