"""Virtual keys: admin API, hashing, rotation with grace, revocation, expiry, the CLI, the key cache."""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa

from helixagent.auth import Authenticator
from helixagent.auth.keys import KeyStore, hash_key
from helixagent.errors import GatewayError
from helixagent.store.db import make_engine
from support.keys import MASTER, admin_create, admin_post, chat, http
from support.servers import wait_until

SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture
def gw(make_gateway):
    return make_gateway({"auth": {"master_key": MASTER}})


def _rows(db_url: str) -> list[dict]:
    eng = sa.create_engine(db_url)
    with eng.connect() as c:
        rows = [dict(r._mapping) for r in c.execute(sa.text("select * from api_keys"))]
    eng.dispose()
    return rows


def test_create_shows_secret_once_and_stores_only_a_hash(gw):
    k = admin_create(gw, user_id="alice", application="app1", role="user", expires_in="30d",
                     limits={"requests_per_minute": 5})
    secret = k["key"]
    assert secret.startswith("hx-") and len(secret) == 46
    assert k["prefix"] == secret[:10] and k["status"] == "active" and k["limits"] == {"requests_per_minute": 5}
    assert k["expires_at"] is not None
    listed = http.get(gw.url + "/admin/keys", headers={"authorization": f"Bearer {MASTER}"}).json()["data"]
    assert [x["id"] for x in listed] == [k["id"]]
    assert secret not in str(listed) and "key_hash" not in listed[0] and "key" not in listed[0]
    rows = _rows(gw.cfg.database.url)
    assert len(rows) == 1 and rows[0]["key_hash"] == hash_key(secret)
    assert secret not in str(rows)
    assert chat(gw, secret).status_code == 200


@pytest.mark.parametrize("body,param", [
    ({"role": "superuser"}, "role"),
    ({"role": "user", "expires_in": "soon"}, "expires_in"),
    ({"role": "user", "limits": {"requests_per_hour": 3}}, "limits.requests_per_hour"),
    ({"role": "user", "limits": {"requests_per_minute": -1}}, "limits.requests_per_minute"),
    ({"role": "user", "user_id": 7}, "user_id"),
])
def test_create_rejects_bad_input_in_openai_shape(gw, body, param):
    r = admin_post(gw, "/admin/keys", body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param


def test_admin_api_errors(gw):
    assert admin_post(gw, "/admin/keys/key_nope/revoke").status_code == 404
    assert admin_post(gw, "/admin/keys/key_nope/rotate", {"grace": "1h"}).status_code == 404
    k = admin_create(gw, user_id="u")
    assert admin_post(gw, f"/admin/keys/{k['id']}/explode").status_code == 404
    r = http.post(gw.url + "/admin/keys", content=b"{not json", headers={"authorization": f"Bearer {MASTER}"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    assert admin_post(gw, f"/admin/keys/{k['id']}/rotate", {"grace": "-5s"}).status_code == 400


def test_rotation_grace_then_only_new_key(gw):
    k = admin_create(gw, user_id="bob", application="a", role="user", limits={"tokens_per_minute": 10000})
    r = admin_post(gw, f"/admin/keys/{k['id']}/rotate", {"grace": "1s"})
    assert r.status_code == 201, r.text
    new = r.json()
    assert new["key"] != k["key"] and new["rotated_from"] == k["id"]
    assert new["user_id"] == "bob" and new["limits"] == {"tokens_per_minute": 10000}
    assert new["previous"]["status"] == "rotating"
    # during the grace period both keys work
    assert chat(gw, k["key"]).status_code == 200
    assert chat(gw, new["key"]).status_code == 200
    # rotating the old key again is refused
    assert admin_post(gw, f"/admin/keys/{k['id']}/rotate", {"grace": "1s"}).status_code == 409
    # after it, only the new one
    assert wait_until(lambda: chat(gw, k["key"]).status_code == 401, timeout=5)
    r = chat(gw, k["key"])
    assert r.json()["error"]["code"] == "rotated_api_key"
    assert chat(gw, new["key"]).status_code == 200


def test_revoke_takes_effect_at_once_on_the_instance(gw):
    k = admin_create(gw, user_id="carol")
    assert chat(gw, k["key"]).status_code == 200   # now cached
    r = admin_post(gw, f"/admin/keys/{k['id']}/revoke")
    assert r.status_code == 200 and r.json()["status"] == "revoked"
    r = chat(gw, k["key"])
    assert r.status_code == 401 and r.json()["error"]["code"] == "revoked_api_key"
    # revoking twice is harmless; a revoked key cannot be rotated
    assert admin_post(gw, f"/admin/keys/{k['id']}/revoke").status_code == 200
    assert admin_post(gw, f"/admin/keys/{k['id']}/rotate").status_code == 409


def test_expiry(gw):
    k = admin_create(gw, user_id="dave", expires_in="1s")
    assert chat(gw, k["key"]).status_code == 200
    assert wait_until(lambda: chat(gw, k["key"]).status_code == 401, timeout=5)
    assert chat(gw, k["key"]).json()["error"]["code"] == "expired_api_key"


def _cli(*args: str, config: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=SRC)
    env.pop("HELIXAGENT_API_KEY", None)
    return subprocess.run([sys.executable, "-m", "helixagent", "keys", *args, "--config", config],
                          capture_output=True, text=True, env=env, timeout=60)


def test_cli_create_list_rotate_revoke_against_a_running_gateway(make_gateway, tmp_path):
    db = f"sqlite:///{tmp_path}/cli.db"
    cfgfile = tmp_path / "cfg.yaml"
    cfgfile.write_text(f"database: {{url: '{db}'}}\n")
    gw = make_gateway({"auth": {"master_key": MASTER}, "database": {"url": db}})
    p = _cli("create", "--user", "erin", "--app", "cli-app", "--role", "user", "--expires", "30d",
             "--rpm", "7", "--tpm", "900", "--json", config=str(cfgfile))
    assert p.returncode == 0, p.stderr
    import json
    created = json.loads(p.stdout)
    assert created["limits"] == {"requests_per_minute": 7, "tokens_per_minute": 900}
    secret = created["key"]
    # without max_tokens the reservation (prompt + default_completion_tokens 1024) exceeds tpm 900
    r = chat(gw, secret)
    assert r.status_code == 429 and "tokens per minute" in r.json()["error"]["message"], r.text
    r = chat(gw, secret, max_tokens=16)
    assert r.status_code == 200, r.text
    assert r.headers["x-ratelimit-limit-requests"] == "7" and r.headers["x-ratelimit-limit-tokens"] == "900"
    p = _cli("list", config=str(cfgfile))
    assert p.returncode == 0 and created["id"] in p.stdout and secret not in p.stdout
    p = _cli("rotate", created["id"], "--grace", "1h", "--json", config=str(cfgfile))
    assert p.returncode == 0, p.stderr
    new = json.loads(p.stdout)
    assert chat(gw, new["key"], max_tokens=16).status_code == 200
    assert chat(gw, secret, max_tokens=16).status_code == 200
    p = _cli("revoke", new["id"], config=str(cfgfile))
    assert p.returncode == 0, p.stderr
    # no Redis here: another process's change reaches the gateway within the 1 s fallback TTL
    assert wait_until(lambda: chat(gw, new["key"], max_tokens=16).status_code == 401, timeout=3)
    p = _cli("revoke", "key_missing", config=str(cfgfile))
    assert p.returncode == 1 and "no API key" in p.stderr
    p = _cli("create", "--role", "root", config=str(cfgfile))
    assert p.returncode == 2


async def test_key_cache_hits_memory_and_bounds_staleness(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path}/c.db")
    store = KeyStore(engine)
    await store.ensure_table()
    now = [1000.0]
    auth = Authenticator(MASTER, store, ttl=60.0, clock=lambda: now[0])
    rec, secret = await store.create(user_id="u", application="a", role="user")
    ident = await auth.identify(secret)
    assert ident.user_id == "u" and ident.role == "user" and auth.db_lookups == 1
    for _ in range(100):
        assert await auth.identify(secret) is ident
    assert auth.db_lookups == 1            # served from memory
    # concurrent misses of the same key share one lookup
    auth.forget(None)
    await asyncio.gather(*(auth.identify(secret) for _ in range(20)))
    assert auth.db_lookups == 2
    # revoked behind the cache's back (another process, no Redis): visible after at most 1 s
    await store.revoke(rec.id)
    now[0] += 0.5
    assert (await auth.identify(secret)).user_id == "u"
    now[0] += 0.6
    with pytest.raises(GatewayError) as e:
        await auth.identify(secret)
    assert e.value.status == 401 and e.value.code == "revoked_api_key"
    # unknown hx- keys are remembered briefly so junk cannot hammer the database
    bad = "hx-" + "Q" * 43
    for _ in range(50):
        with pytest.raises(GatewayError):
            await auth.identify(bad)
    assert auth.db_lookups == 4
    await engine.dispose()


async def test_key_store_down_gives_503_not_a_crash(tmp_path):
    class Broken(KeyStore):
        async def by_hash(self, key_hash):
            raise OSError("database is gone")
    auth = Authenticator(MASTER, Broken(None))  # type: ignore[arg-type]
    with pytest.raises(GatewayError) as e:
        await auth.identify("hx-" + "B" * 43)
    assert e.value.status == 503 and "unavailable" in e.value.message


async def test_key_store_on_postgresql():
    from conftest import need_postgres
    import uuid
    url = need_postgres()
    schema = "hxkeys_" + uuid.uuid4().hex[:10]
    admin = make_engine(url)
    async with admin.begin() as c:
        await c.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    engine = make_engine(url, connect_args={"server_settings": {"search_path": schema}})
    try:
        store = KeyStore(engine)
        assert await store.ensure_table() is True
        assert await store.ensure_table() is False
        rec, secret = await store.create(user_id="pg", application="app", role="readonly",
                                         limits={"tokens_per_day": 5})
        got = await store.by_hash(hash_key(secret))
        assert got is not None and got.id == rec.id and got.limits == {"tokens_per_day": 5}
        assert got.created_at.tzinfo is not None
        new, secret2, old = await store.rotate(rec.id, 60)
        assert old.status() == "rotating" and new.rotated_from == rec.id
        with pytest.raises(GatewayError) as e:
            await store.rotate(rec.id, 60)
        assert e.value.status == 409
        assert (await store.revoke(new.id)).status() == "revoked"
        auth = Authenticator(MASTER, store)
        with pytest.raises(GatewayError) as e:
            await auth.identify(secret2)
        assert e.value.code == "revoked_api_key"
        assert (await auth.identify(secret)).role == "readonly"
        assert [r.id for r in await store.list(user_id="pg")] == [rec.id, new.id]
    finally:
        await engine.dispose()
        async with admin.begin() as c:
            await c.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        await admin.dispose()


def test_get_and_delete_single_key(make_gateway):
    import httpx
    gw = make_gateway({"auth": {"master_key": MASTER}})
    rec = admin_create(gw, role="user", user_id="single")
    h = {"authorization": f"Bearer {MASTER}"}
    r = httpx.get(f"{gw.url}/admin/keys/{rec['id']}", headers=h)
    assert r.status_code == 200 and r.json()["id"] == rec["id"] and "key" not in r.json()
    assert httpx.get(f"{gw.url}/admin/keys/nope", headers=h).status_code == 404
    r = httpx.delete(f"{gw.url}/admin/keys/{rec['id']}", headers=h)
    assert r.status_code == 200 and r.json()["revoked_at"]
    r = httpx.post(gw.url + "/v1/chat/completions", headers={"authorization": f"Bearer {rec['key']}"},
                   json={"model": "m", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 401
    assert httpx.put(f"{gw.url}/admin/keys/{rec['id']}", headers=h).status_code == 405
