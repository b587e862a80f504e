"""Shared pieces of the ensemble tests: the panel fake, a gateway of providers a/b/c (+ judge j) on it, the
openai SDK as client, records."""
from __future__ import annotations

from typing import Any, Iterator

import openai
import pytest
import sqlalchemy as sa
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from support.panel_fake import PanelFake, Script

from helixagent.store.db import make_sync_engine
from helixagent.store.schema import completions as C

MSG = [{"role": "user", "content": "What is the capital of France?"}]
PRICES = {"input_per_mtok": 1.0, "output_per_mtok": 2.0}


@pytest.fixture(scope="session")
def panel_session() -> Iterator[PanelFake]:
    f = PanelFake()
    yield f
    f.close()


@pytest.fixture
def panel(panel_session: PanelFake) -> Iterator[PanelFake]:
    panel_session.reset()
    yield panel_session
    panel_session.reset()


def providers(panel: PanelFake, names: tuple[str, ...] = ("a", "b", "c", "j"), **extra: Any) -> list[dict[str, Any]]:
    return [panel.provider(n, model_prices={f"{n}-model": PRICES}, **extra) for n in names]


def gateway_cfg(panel: PanelFake, tmp_path: Any, **over: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {"providers": providers(panel),
                           "database": {"url": f"sqlite:///{tmp_path}/ens.db", "spool_dir": str(tmp_path / "spool"),
                                        "flush_interval": "50ms"}}
    cfg.update(over)
    return cfg


def client(gw: Any, key: str = "sk-anything") -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0, timeout=30)


def ensemble(gw: Any, cfg: dict[str, Any] | None, key: str = "sk-anything", **body: Any) -> ChatCompletion:
    body.setdefault("model", "gpt-4o")
    body.setdefault("messages", MSG)
    if cfg is not None:
        body["ensemble_config"] = cfg
    return client(gw, key).post("/ensemble/completions", body=body, cast_to=ChatCompletion)


def ensemble_raw(gw: Any, cfg: dict[str, Any] | None, key: str = "sk-anything", **body: Any) -> Any:
    body.setdefault("model", "gpt-4o")
    body.setdefault("messages", MSG)
    if cfg is not None:
        body["ensemble_config"] = cfg
    return client(gw, key).post("/ensemble/completions", body=body, cast_to=ChatCompletion,
                                options={"headers": {"X-Stainless-Raw-Response": "true"}})


def ensemble_stream(gw: Any, cfg: dict[str, Any], **body: Any) -> list[ChatCompletionChunk]:
    body.setdefault("model", "gpt-4o")
    body.setdefault("messages", MSG)
    body["ensemble_config"] = cfg
    body["stream"] = True
    s = client(gw).post("/ensemble/completions", body=body, cast_to=ChatCompletion, stream=True,
                        stream_cls=openai.Stream[ChatCompletionChunk])
    return list(s)


def flush(gw: Any) -> None:
    assert gw.run(gw.app.services["records"].writer.flush(20), timeout=30)


def records(gw: Any, ensemble_id: str) -> list[dict[str, Any]]:
    flush(gw)
    eng = make_sync_engine(gw.cfg.database.url)
    try:
        with eng.connect() as conn:
            q = sa.select(C).where(C.c.ensemble_id == ensemble_id).order_by(C.c.request_id)
            return [dict(r) for r in conn.execute(q).mappings()]
    finally:
        eng.dispose()


__all__ = ["MSG", "PanelFake", "Script", "client", "ensemble", "ensemble_raw", "ensemble_stream", "gateway_cfg",
           "panel", "panel_session", "providers", "records"]
