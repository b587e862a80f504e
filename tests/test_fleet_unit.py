"""providers/fleet.py in-process: what a reload rebuilds and what it keeps (the docstring's promise: an
unchanged providers[] entry keeps its object and connection pool), what it retires, and the warning for
a provider without its key."""
from __future__ import annotations

import asyncio
import logging

import pytest

from helixagent.config import load_config_dict
from helixagent.providers.fleet import build_fleet

VENDOR_ENVS = ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "DEEPSEEK_API_KEY", "GEMINI_API_KEY")


@pytest.fixture(autouse=True)
def _no_vendor_keys(monkeypatch):
    for k in VENDOR_ENVS:
        monkeypatch.delenv(k, raising=False)


def _cfg(*providers):
    return load_config_dict({"providers": list(providers)}, "test")


def _close(fleet):
    async def go():
        for p in fleet.providers.values():
            await p.close()
    asyncio.run(go())


A = {"name": "a", "type": "openai_compatible", "base_url": "http://127.0.0.1:9/v1", "models": ["m1"]}
B = {"name": "b", "type": "openai_compatible", "base_url": "http://127.0.0.1:9/v1", "models": ["m2"]}


def test_unchanged_entries_keep_their_objects_changed_and_removed_ones_are_retired():
    cfg1 = _cfg(A, B)
    f1 = build_fleet(cfg1, cfg1.http)
    cfg2 = _cfg(A, dict(B, models=["m2", "m3"]), dict(A, name="c"))
    f2 = build_fleet(cfg2, cfg1.http, f1)
    try:
        assert f2.providers["a"] is f1.providers["a"]          # same entry: same client and pool
        assert f2.providers["b"] is not f1.providers["b"]      # changed entry: a new object
        assert set(f2.providers) == {"a", "b", "c"}
        assert f1.retired_by(f2) == [f1.providers["b"]]        # only the replaced one is to be closed
        cfg3 = _cfg(B)
        f3 = build_fleet(cfg3, cfg1.http, f2)
        assert {id(p) for p in f2.retired_by(f3)} == {id(f2.providers["a"]), id(f2.providers["b"]),
                                                      id(f2.providers["c"])}
        # other http: pool settings rebuild every provider (the pool is part of the object)
        f4 = build_fleet(cfg3, cfg3.http.model_copy(update={"max_idle_conns": 7}), f3)
        assert f4.providers["b"] is not f3.providers["b"]
        _close(f3)
        _close(f4)
    finally:
        _close(f1)
        _close(f2)


def test_a_provider_without_its_key_is_disabled_with_the_variable_named(caplog):
    cfg = _cfg(A, {"name": "claude", "type": "anthropic"})
    with caplog.at_level(logging.WARNING, logger="helixagent"):
        f = build_fleet(cfg, cfg.http)
    try:
        assert set(f.providers) == {"a"} and not f.mock_fallback
        msg = next(r.getMessage() for r in caplog.records if "has no API key" in r.getMessage())
        assert "provider claude" in msg and "ANTHROPIC_API_KEY" in msg
    finally:
        _close(f)


def test_mock_stand_ins_are_rebuilt_when_a_key_appears():
    openai = {"name": "openai", "type": "openai", "models": ["gpt-4o-mini"]}
    cfg1 = _cfg(openai)
    f1 = build_fleet(cfg1, cfg1.http)
    assert f1.mock_fallback and f1.providers["openai"].name == "mock"
    again = build_fleet(cfg1, cfg1.http, f1)
    assert again.providers["openai"] is f1.providers["openai"]   # still no key: the stand-in is kept
    cfg2 = _cfg(dict(openai, api_key="sk-test-review-0000"))
    f2 = build_fleet(cfg2, cfg1.http, f1)
    try:
        assert not f2.mock_fallback and f2.providers["openai"] is not f1.providers["openai"]
        assert f2.providers["openai"].name == "openai"
    finally:
        _close(f1)
        _close(f2)
