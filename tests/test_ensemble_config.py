"""The ``ensembles:`` config section: strict keys, and a named ensemble checked against the providers when the
config loads (not at its first request)."""
from __future__ import annotations

import pytest

from helixagent.config import ConfigError, load_config_dict

PROVIDERS = [{"name": "a", "type": "mock", "models": ["m"]}, {"name": "b", "type": "mock", "models": ["m"]}]


def _load(ens: dict) -> object:
    return load_config_dict({"providers": PROVIDERS, "ensembles": {"e": ens}}, "<test>")


def test_a_valid_named_ensemble_loads():
    cfg = _load({"strategy": "judge", "providers": ["a", "b"], "judge": {"provider": "b"}, "min_providers": 2,
                 "panel_timeout_ms": 5000})
    e = cfg.ensembles["e"]
    assert e.strategy == "judge" and e.judge.provider == "b" and e.judge_mode == "synthesis" and e.rounds == 2


@pytest.mark.parametrize("ens,needle", [
    ({"providers": ["a", "zzz"]}, "provider 'zzz' is not configured"),
    ({"members": [{"provider": "a"}], "judge": {"provider": "nope"}}, "provider 'nope' is not configured"),
    ({"strategy": "majority"}, "the panel is empty"),
    ({"providers": ["a", "b"], "min_providers": 3}, "min_providers"),
    ({"providers": ["a", "b"], "strategy": "judge"}, "needs a judge"),
    ({"providers": ["a", "b"], "models": ["m"]}, "one model per provider"),
    ({"providers": ["a", "b"], "stratgy": "majority"}, "stratgy"),
    ({"providers": ["a", "b"], "rounds": 9}, "rounds"),
    ({"providers": ["a", "b"], "weights": {"a": -1}}, "weights"),
    ({"providers": ["a", "b"], "judge_mode": "best"}, "judge_mode"),
])
def test_bad_named_ensembles_fail_at_load_naming_the_key(ens, needle):
    with pytest.raises(ConfigError) as ei:
        _load(ens)
    assert needle in str(ei.value) and "ensembles" in str(ei.value), str(ei.value)


def test_named_ensembles_are_applied_by_a_config_reload(make_gateway, tmp_path):
    import httpx

    from helixagent.config import load_config_dict as load
    base = {"providers": PROVIDERS, "database": {"url": f"sqlite:///{tmp_path}/r.db", "spool_dir": str(tmp_path / "s")}}
    gw = make_gateway(base)
    body = {"model": "ensemble/late", "messages": [{"role": "user", "content": "hi"}]}
    assert httpx.post(gw.url + "/v1/chat/completions", json=body, timeout=10).status_code == 404
    new = load({**base, "ensembles": {"late": {"providers": ["a", "b"]}}}, "<reload>")
    report = gw.run(gw.app.services["reload"].apply(new))
    assert "ensembles" in report["changed"]
    r = httpx.post(gw.url + "/v1/chat/completions", json=body, timeout=10)
    assert r.status_code == 200 and r.json()["ensemble"]["name"] == "late", r.text
