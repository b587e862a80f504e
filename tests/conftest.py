"""Shared fixtures: fake upstreams and a gateway over real HTTP."""
from __future__ import annotations

import os
from typing import Any, Callable, Iterator

import pytest

from fakes.openai_upstream import FakeOpenAI
from support.servers import GatewayServer

POSTGRES_URL = os.environ.get("HELIX_TEST_POSTGRES_URL")
REDIS_URL = os.environ.get("HELIX_TEST_REDIS_URL")
IN_CI = bool(os.environ.get("CI"))


def need_postgres() -> str:
    """The PostgreSQL URL for real-server tests.  Missing in CI is a failure, not a skip."""
    if not POSTGRES_URL:
        if IN_CI:
            pytest.fail("HELIX_TEST_POSTGRES_URL is not set in CI")
        pytest.skip("HELIX_TEST_POSTGRES_URL not set")
    return POSTGRES_URL


def need_redis() -> str:
    if not REDIS_URL:
        if IN_CI:
            pytest.fail("HELIX_TEST_REDIS_URL is not set in CI")
        pytest.skip("HELIX_TEST_REDIS_URL not set")
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
