"""The model catalogue: shipped data is complete and sane, lookups resolve snapshots, config overrides win."""
from __future__ import annotations

import pytest

from helixagent.config import ProviderConfig
from helixagent.providers import catalogue as cat


def cfg(name: str, **kw) -> ProviderConfig:
    return ProviderConfig(name=name, api_key="k", **kw)


def test_shipped_data_is_complete():
    c = cat.catalogue()
    for ptype in ("openai", "anthropic", "deepseek", "gemini"):
        assert cat.models_for(ptype), ptype
        for name in cat.models_for(ptype):
            info = c.by_type[ptype][name]
            assert info.context_window and info.context_window > 0, name
            assert info.input_per_mtok is not None and info.input_per_mtok >= 0, name
            assert info.output_per_mtok is not None and info.output_per_mtok >= 0, name
            if not info.embedding:
                assert info.output_per_mtok >= info.input_per_mtok, name  # output never cheaper than input
    for required in ("gpt-4o", "gpt-4o-mini", "gpt-4.1", "gpt-4.1-mini", "o3", "o4-mini",
                     "text-embedding-3-small"):
        assert required in cat.models_for("openai")
    for required in ("claude-3-5-haiku-latest", "claude-3-7-sonnet-latest", "claude-sonnet-4-0",
                     "claude-sonnet-4-5", "claude-opus-4-0"):
        assert required in cat.models_for("anthropic")
    assert {"deepseek-chat", "deepseek-reasoner"} <= set(cat.models_for("deepseek"))
    for required in ("gemini-1.5-flash", "gemini-1.5-pro", "gemini-2.0-flash", "gemini-2.5-pro", "gemini-2.5-flash"):
        assert required in cat.models_for("gemini")


def test_price_and_snapshots():
    o = cfg("openai")
    assert cat.price(o, "gpt-4o") == pytest.approx((2.5e-6, 10e-6))
    assert cat.price(o, "gpt-4o-2024-08-06") == cat.price(o, "gpt-4o")
    assert cat.price(o, "gpt-4o-mini-2024-07-18") == cat.price(o, "gpt-4o-mini")
    a = cfg("claude")
    assert cat.price(a, "claude-3-5-haiku-20241022") == pytest.approx((0.8e-6, 4e-6))
    assert cat.context_window(a, "claude-sonnet-4-20250514") == 200000
    g = cfg("gemini")
    assert cat.price(g, "models/gemini-1.5-flash-002") == cat.price(g, "gemini-1.5-flash")
    assert cat.price(o, "no-such-model") is None and cat.context_window(o, "no-such-model") is None
    # a model of another vendor is not priced by type
    assert cat.price(o, "claude-sonnet-4-5") is None
    # an OpenAI-compatible server serving a known name is priced like the vendor
    oc = ProviderConfig(name="vllm", type="openai_compatible", base_url="http://x")
    assert cat.price(oc, "gpt-4o") == cat.price(o, "gpt-4o")


def test_overrides():
    o = cfg("openai", model_prices={"gpt-4o": {"input_per_mtok": 1.0}, "my-ft": {"input_per_mtok": 3,
                                                                                "output_per_mtok": 6,
                                                                                "context_window": 4096}})
    assert cat.price(o, "gpt-4o") == pytest.approx((1e-6, 10e-6))  # output keeps the catalogue price
    assert cat.price(o, "my-ft") == pytest.approx((3e-6, 6e-6))
    assert cat.context_window(o, "my-ft") == 4096
    half = cfg("openai", model_prices={"other": {"input_per_mtok": 1.0}})
    assert cat.price(half, "other") is None  # incomplete: unknown output price
    # memoised lookups see a config change (new override object)
    o2 = cfg("openai", model_prices={"gpt-4o": {"input_per_mtok": 9.0}})
    assert cat.price(o2, "gpt-4o")[0] == pytest.approx(9e-6)


def test_estimate_cost():
    a = cfg("claude")
    # 1M plain input + 1M output on Sonnet 4.5: $3 + $15
    assert cat.estimate_cost(a, "claude-sonnet-4-5", 1_000_000, 1_000_000) == pytest.approx(18.0)
    # cache reads at $0.30/M and writes at $3.75/M, counted inside prompt_tokens
    c = cat.estimate_cost(a, "claude-sonnet-4-5", 1_000_000, 0, cache_read_tokens=500_000,
                          cache_creation_tokens=250_000)
    assert c == pytest.approx(0.25 * 3 + 0.5 * 0.30 + 0.25 * 3.75)
    assert cat.estimate_cost(a, "unknown", 10, 10) is None
    # a Provider object works as well as its config
    class P:
        cfg = a
    assert cat.estimate_cost(P(), "claude-sonnet-4-5", 10, 10) == cat.estimate_cost(a, "claude-sonnet-4-5", 10, 10)


def test_serves_from_catalogue():
    from helixagent.config import HTTPConfig
    from helixagent.providers import build_provider
    p = build_provider(cfg("claude"), HTTPConfig())
    assert p.serves("claude-sonnet-4-5") and p.serves("claude-3-5-haiku-20241022") and not p.serves("gpt-4o")
    assert "claude-sonnet-4-5" in p.models()
    q = build_provider(cfg("openai"), HTTPConfig())
    assert q.serves("gpt-4o") and not q.serves("gemini-2.0-flash")
    r = build_provider(cfg("claude", models=["only-this"]), HTTPConfig())
    assert r.models() == ["only-this"] and not r.serves("claude-sonnet-4-5")
