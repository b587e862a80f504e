"""Feature flags (features: streaming, caching, multi_tenant): the rules per environment, key, user and
percentage, and their effect on a real gateway, flipped live by a config reload."""
from __future__ import annotations

from typing import Any

import httpx
import pytest

from helixagent.config import ConfigError, load_config_dict
from helixagent.flags import Flags, Rule, bucket
from helixagent.pipeline import Identity
from support.keys import MASTER, admin_create

AUTH = {"authorization": f"Bearer {MASTER}"}


def flags(env: str = "development", **features: Any) -> Flags:
    return Flags(load_config_dict({"environment": env, "features": features}))


def ident(key: str | None = None, user: str | None = None, app: str | None = None) -> Identity:
    return Identity(key_id=key, user_id=user, application=app, role="user")


# -- rules ---------------------------------------------------------------------------------------------------
def test_defaults_keep_todays_behaviour():
    f = flags()
    for who in (None, ident("k1"), ident(None, "u1")):
        assert f.streaming.on(who) and f.caching.on(who) and not f.multi_tenant.on(who)
    assert f.streaming.always and f.caching.always and f.multi_tenant.never
    assert f.describe() == {"streaming": "on", "caching": "on", "multi_tenant": "off"}


def test_enabled_and_environments():
    f = flags("production", streaming={"enabled": False}, caching={"environments": ["staging"]},
              multi_tenant={"enabled": True, "environments": ["production"]})
    assert not f.streaming.on(ident("k1"))
    assert not f.caching.on(ident("k1"))  # not in staging
    assert f.multi_tenant.on(ident("k1"))
    assert flags("staging", caching={"environments": ["staging"]}).caching.on(ident("k1"))


def test_keys_and_users_are_allow_lists_within_the_environments():
    f = flags("production", multi_tenant={"enabled": False, "keys": ["k-on"], "users": ["u-on"],
                                          "environments": ["production"]})
    assert f.multi_tenant.on(ident("k-on"))
    assert f.multi_tenant.on(ident("k-other", "u-on"))
    assert not f.multi_tenant.on(ident("k-other", "u-other"))
    assert not f.multi_tenant.on(None)
    g = flags("development", multi_tenant={"enabled": False, "keys": ["k-on"], "environments": ["production"]})
    assert not g.multi_tenant.on(ident("k-on"))  # listed, but not in this environment


def test_percentage_is_stable_and_roughly_right():
    ids = [f"key-{i:05d}" for i in range(1000)]
    f = flags(caching={"enabled": True, "percentage": 25})
    on = [k for k in ids if f.caching.on(ident(k))]
    assert 200 <= len(on) <= 300, len(on)
    # stable: the same keys in a new configuration object (another process, a reload) and on repeat
    g = flags(caching={"enabled": True, "percentage": 25})
    assert [k for k in ids if g.caching.on(ident(k))] == on
    assert [k for k in ids if f.caching.on(ident(k))] == on
    assert all(bucket("caching", k) < 2500 for k in on)
    # growing the percentage only adds keys
    h = flags(caching={"enabled": True, "percentage": 50})
    on50 = {k for k in ids if h.caching.on(ident(k))}
    assert set(on) <= on50 and 400 <= len(on50) <= 600
    # 0 and 100, and callers without a key id
    assert not any(flags(caching={"percentage": 0}).caching.on(ident(k)) for k in ids[:50])
    assert all(flags(caching={"percentage": 100}).caching.on(ident(k)) for k in ids[:50])
    assert not f.caching.on(None) and f.caching.on(ident(None, "u")) == (bucket("caching", "u") < 2500)
    # the listed keys are on whatever their bucket
    off_key = next(k for k in ids if k not in on)
    assert flags(caching={"percentage": 25, "keys": [off_key]}).caching.on(ident(off_key))


def test_invalid_flag_config_is_rejected():
    with pytest.raises(ConfigError, match="features.caching.percentage"):
        load_config_dict({"features": {"caching": {"percentage": 120}}})
    with pytest.raises(ConfigError, match="features.tracing: unknown key"):
        load_config_dict({"features": {"tracing": {"enabled": True}}})
    assert isinstance(flags().streaming, Rule)


# -- on a gateway ------------------------------------------------------------------------------------------
@pytest.fixture
def gw(make_gateway, fake_openai):
    cfg = {"providers": [fake_openai.provider()], "auth": {"master_key": MASTER},
           "cache": {"enabled": True, "cache_nonzero_temperature": True}}
    g = make_gateway(cfg)
    g.cfg_data = cfg
    return g


def reload(gw: Any, **features: Any) -> dict[str, Any]:
    data = dict(gw.cfg_data, features=features)
    report: dict[str, Any] = gw.run(gw.app.services["reload"].apply(load_config_dict(data), "test"))
    return report


def post(gw: Any, key: str, path: str = "/v1/chat/completions", text: str = "hi", **body: Any) -> httpx.Response:
    if path == "/v1/messages":
        body = {"model": "gpt-4o-mini", "max_tokens": 20, "messages": [{"role": "user", "content": text}], **body}
        h = {"x-api-key": key, "anthropic-version": "2023-06-01"}
    else:
        body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}], **body}
        h = {"authorization": f"Bearer {key}"}
    return httpx.post(gw.url + path, json=body, headers=h, timeout=20)


def test_streaming_flag_per_key_and_live_reload(gw):
    a = admin_create(gw)
    b = admin_create(gw)
    assert post(gw, a["key"], stream=True).status_code == 200
    rep = reload(gw, streaming={"enabled": False, "keys": [b["id"]]})
    assert rep["changed"] == ["features"] and rep["generation"] == 2
    r = post(gw, a["key"], stream=True)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "stream" and err["code"] == "streaming_disabled" and "stream" in err["message"]
    r = post(gw, a["key"], path="/v1/messages", stream=True)  # the Anthropic error shape
    assert r.status_code == 400 and r.json()["type"] == "error", r.text
    assert "stream" in r.json()["error"]["message"]
    assert post(gw, a["key"]).status_code == 200  # non-streamed requests are not affected
    assert post(gw, b["key"], stream=True).status_code == 200  # a listed key keeps streaming
    reload(gw)  # back to the defaults
    assert post(gw, a["key"], stream=True).status_code == 200


def test_caching_flag_bypasses_the_cache(gw):
    k = admin_create(gw, application="app1")
    assert post(gw, k["key"], text="cache me").headers["x-helixagent-cache"] == "MISS"
    assert post(gw, k["key"], text="cache me").headers["x-helixagent-cache"] == "HIT"
    reload(gw, caching={"enabled": False})
    assert post(gw, k["key"], text="cache me").headers["x-helixagent-cache"] == "BYPASS"
    reload(gw, caching={"enabled": False, "users": ["nobody"], "keys": [k["id"]]})
    assert post(gw, k["key"], text="cache me").headers["x-helixagent-cache"] == "HIT"  # the entry survived


def test_multi_tenant_isolates_cache_entries_per_user(gw):
    u1 = admin_create(gw, application="shared", user_id="alice")
    u2 = admin_create(gw, application="shared", user_id="bob")
    # off (the default): cache.scope application -- one application shares its entries
    assert post(gw, u1["key"], text="tenant q").headers["x-helixagent-cache"] == "MISS"
    assert post(gw, u2["key"], text="tenant q").headers["x-helixagent-cache"] == "HIT"
    reload(gw, multi_tenant={"enabled": True})
    assert post(gw, u1["key"], text="tenant q2").headers["x-helixagent-cache"] == "MISS"
    assert post(gw, u2["key"], text="tenant q2").headers["x-helixagent-cache"] == "MISS"
    assert post(gw, u2["key"], text="tenant q2").headers["x-helixagent-cache"] == "HIT"


def test_multi_tenant_confines_usage_to_the_application(gw):
    k = admin_create(gw, application="app-a", user_id="carol")
    assert post(gw, k["key"]).status_code == 200
    h = {"authorization": f"Bearer {k['key']}"}
    r = httpx.get(gw.url + "/v1/usage", headers=h, timeout=10)
    assert r.status_code == 200 and r.json()["scope"] == "user", r.text
    reload(gw, multi_tenant={"enabled": True})
    r = httpx.get(gw.url + "/v1/usage", headers=h, timeout=10)
    assert r.status_code == 200 and r.json()["scope"] == "user+application", r.text
    r = httpx.get(gw.url + "/v1/usage", params={"application": "app-b"}, headers=h, timeout=10)
    assert r.status_code == 403 and r.json()["error"]["param"] == "application", r.text
    assert httpx.get(gw.url + "/v1/usage", params={"application": "app-b"}, headers=AUTH,
                     timeout=10).status_code == 200  # an admin still sees every application


def test_in_process_gateway_has_no_file_to_reload(gw):
    r = httpx.post(gw.url + "/admin/reload", headers=AUTH, timeout=10)
    assert r.status_code == 422 and "not started from a config file" in r.json()["error"]["message"], r.text
    h = httpx.get(gw.url + "/health", headers=AUTH, timeout=10).json()["config"]
    assert h["source"] == "<in-process>" and h["generation"] == 1
    user = admin_create(gw)["key"]
    r = httpx.post(gw.url + "/admin/reload", headers={"authorization": f"Bearer {user}"}, timeout=10)
    assert r.status_code == 403, r.text
