"""Stored responses of the Responses API: the ``responses`` table (revision 0004_responses).

A response created with ``store`` not false is saved with its input items and the conversation before it,
so ``previous_response_id`` rebuilds the conversation on any instance, after any restart.  Rows are
tenant-scoped (:func:`tenant_of`: the key id that created it, else the user; another tenant's lookup is a
miss, answered as a 404 exactly like an unknown id) and their blobs are encrypted with the record keyring
when encryption is on (associated data binds each blob to its id and column)."""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from .crypto import Keyring
from .schema import responses as table

_BLOBS = ("history", "input_items", "response")


def tenant_of(identity: Any) -> str:
    if identity is None:
        return ""
    key_id, user_id = getattr(identity, "key_id", None), getattr(identity, "user_id", None)
    if key_id:
        return f"k:{key_id}"
    if user_id:
        return f"u:{user_id}"
    return ""


@dataclass(slots=True)
class Stored:
    id: str
    status: str
    native: bool
    provider: str | None
    history: list[dict[str, Any]]
    input_items: list[dict[str, Any]]
    response: dict[str, Any]

    def conversation(self) -> list[dict[str, Any]]:
        """Every item up to and including this response's output: the context of the next turn."""
        return self.history + self.input_items + list(self.response.get("output") or ())


class ResponseStore:
    def __init__(self, engine: AsyncEngine, keyring: Keyring | None):
        self.engine = engine
        self.keyring = keyring

    def _seal(self, rid: str, column: str, value: Any) -> bytes:
        data: bytes = orjson.dumps(value)
        return self.keyring.encrypt(data, rid, column) if self.keyring is not None else data

    def _open(self, rid: str, column: str, blob: bytes | None, key_id: str | None) -> Any:
        if blob is None:
            return None
        if key_id is not None:
            if self.keyring is None:
                raise RuntimeError(f"stored response {rid} is encrypted with key {key_id!r} but encryption is off")
            blob = self.keyring.decrypt(blob, key_id, rid, column)
        return orjson.loads(blob)

    async def save(self, *, rid: str, tenant: str, request_id: str, provider: str | None, model: str | None,
                   status: str, native: bool, previous: str | None, history: list[dict[str, Any]],
                   input_items: list[dict[str, Any]], response: dict[str, Any]) -> None:
        row = {"id": rid, "tenant": tenant, "created_at": dt.datetime.now(dt.timezone.utc), "request_id": request_id,
               "provider": provider, "model": model, "status": status, "native": native,
               "previous_response_id": previous,
               "history": self._seal(rid, "history", history),
               "input_items": self._seal(rid, "input_items", input_items),
               "response": self._seal(rid, "response", response),
               "enc_key_id": self.keyring.active_id if self.keyring is not None else None}
        async with self.engine.begin() as conn:
            await conn.execute(sa.delete(table).where(table.c.id == rid, table.c.tenant == tenant))
            await conn.execute(sa.insert(table).values(**row))

    async def get(self, rid: str, tenant: str) -> Stored | None:
        async with self.engine.connect() as conn:
            r = (await conn.execute(sa.select(table).where(table.c.id == rid, table.c.tenant == tenant))).first()
        if r is None:
            return None
        m = r._mapping
        vals = {c: self._open(rid, c, m[c], m["enc_key_id"]) for c in _BLOBS}
        return Stored(rid, m["status"], bool(m["native"]), m["provider"], vals["history"] or [],
                      vals["input_items"] or [], vals["response"] or {})

    async def delete(self, rid: str, tenant: str) -> bool:
        async with self.engine.begin() as conn:
            res = await conn.execute(sa.delete(table).where(table.c.id == rid, table.c.tenant == tenant))
        return bool(res.rowcount)
