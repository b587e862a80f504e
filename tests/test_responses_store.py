"""Stored responses (/v1/responses with store not false) on SQLite and the real PostgreSQL: shared by
instances and kept across restarts, tenant-scoped (one key cannot read, list, delete or continue another's),
encrypted at rest with the record keyring."""
from __future__ import annotations

import base64
from typing import Any, Iterator

import openai
import pytest
import sqlalchemy as sa

from conftest import need_postgres
from support.keys import MASTER, admin_create
from support.pg import fresh_schema

K1 = "k20200101:" + base64.b64encode(b"7" * 32).decode()


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: Any, tmp_path: Any) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/resp.db"
        return
    gen = fresh_schema(need_postgres())
    yield next(gen)
    gen.close()


def cfg(db_url: str, tmp_path: Any, fake: Any, n: int) -> dict[str, Any]:
    return {"auth": {"master_key": MASTER}, "encryption": {"enabled": True},
            "providers": [fake.provider(type="openai_compatible", max_retries=0)],
            "database": {"url": db_url, "spool_dir": str(tmp_path / f"spool{n}"), "auto_migrate": True}}


def oai(gw: Any, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0, timeout=20)


def test_shared_tenant_scoped_encrypted_and_restart_safe(db_url: str, tmp_path: Any, make_gateway: Any,
                                                         fake_openai: Any, monkeypatch: Any) -> None:
    monkeypatch.setenv("HELIXAGENT_ENCRYPTION_KEYS", K1)
    a = make_gateway(cfg(db_url, tmp_path, fake_openai, 0))
    b = make_gateway(cfg(db_url, tmp_path, fake_openai, 1))
    k1 = admin_create(a, user_id="alice", role="user")["key"]
    k2 = admin_create(a, user_id="bob", role="user")["key"]
    r1 = oai(a, k1).responses.create(model="gpt-4o-mini", input="zebra secret words")
    # instance B reads it and continues the conversation from the shared database
    assert oai(b, k1).responses.retrieve(r1.id).output_text == r1.output_text
    r2 = oai(b, k1).responses.create(model="gpt-4o-mini", input="next turn", previous_response_id=r1.id)
    sent = fake_openai.calls[-1]["body"]["messages"]
    assert [m["role"] for m in sent] == ["user", "assistant", "user"]
    assert sent[0]["content"] == "zebra secret words" and sent[1]["content"] == r1.output_text
    # another key: every way in is a 404, exactly as for an id that does not exist
    other = oai(b, k2)
    for call in (lambda: other.responses.retrieve(r1.id), lambda: other.responses.input_items.list(r1.id),
                 lambda: other.responses.delete(r1.id), lambda: other.responses.cancel(r1.id),
                 lambda: other.responses.create(model="gpt-4o-mini", input="steal", previous_response_id=r1.id)):
        with pytest.raises(openai.NotFoundError):
            call()
    # at rest: encrypted, nothing of the conversation in the clear
    eng = sa.create_engine(db_url if db_url.startswith("sqlite") else
                           db_url.replace("postgresql://", "postgresql+psycopg2://", 1))
    with eng.connect() as c:
        rows = [dict(r._mapping) for r in c.execute(sa.text("select * from responses"))]
    eng.dispose()
    assert {r["id"] for r in rows} == {r1.id, r2.id}
    assert all(r["enc_key_id"] == "k20200101" for r in rows)
    blob = b"".join(bytes(r["response"]) + bytes(r["input_items"]) + bytes(r["history"] or b"") for r in rows)
    assert b"zebra" not in blob and b"next turn" not in blob
    # a restart (a new instance on the same database) still has them; the owner can delete
    a.close()
    c2 = make_gateway(cfg(db_url, tmp_path, fake_openai, 2))
    assert oai(c2, k1).responses.retrieve(r2.id).previous_response_id == r1.id
    items = oai(c2, k1).responses.input_items.list(r2.id)
    assert items.data[0].content[0].text == "next turn" and items.has_more is False
    oai(c2, k1).responses.delete(r1.id)
    with pytest.raises(openai.NotFoundError):
        oai(b, k1).responses.retrieve(r1.id)


def test_store_false_keeps_nothing(db_url: str, tmp_path: Any, make_gateway: Any, fake_openai: Any,
                                   monkeypatch: Any) -> None:
    monkeypatch.setenv("HELIXAGENT_ENCRYPTION_KEYS", K1)
    gw = make_gateway(cfg(db_url, tmp_path, fake_openai, 0))
    r = oai(gw, MASTER).responses.create(model="gpt-4o-mini", input="forget me", store=False)
    with pytest.raises(openai.NotFoundError):
        oai(gw, MASTER).responses.retrieve(r.id)
    with pytest.raises(openai.NotFoundError):
        oai(gw, MASTER).responses.create(model="gpt-4o-mini", input="x", previous_response_id=r.id)
