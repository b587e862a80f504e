"""OpenTelemetry spans: one per request, a child per upstream call (streams end with the stream); off and
silent when tracing is disabled or the packages are missing."""
from __future__ import annotations

import builtins
import logging

import openai
import pytest

from fakes.openai_upstream import Fault

sdk = pytest.importorskip("opentelemetry.sdk.trace")
from opentelemetry import trace  # noqa: E402
from opentelemetry.sdk.trace import TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402

EXPORTER = InMemorySpanExporter()


@pytest.fixture(scope="module", autouse=True)
def provider():
    tp = TracerProvider()
    tp.add_span_processor(SimpleSpanProcessor(EXPORTER))
    trace.set_tracer_provider(tp)  # once per process
    yield tp


def test_request_and_upstream_spans(make_gateway, fake_openai):
    EXPORTER.clear()
    gw = make_gateway({"providers": [fake_openai.provider(max_retries=0, fallback_to=["backup"]),
                                     fake_openai.provider(max_retries=0, name="backup", priority=2)],
                       "tracing": {"enabled": True}})
    c = openai.OpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0)
    c.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "a"}],
                              extra_headers={"x-request-id": "trace-1"})
    list(c.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "a b"}], stream=True,
                                   extra_headers={"x-request-id": "trace-2"}))
    fake_openai.push(Fault(status=503))
    c.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "a"}],
                              extra_headers={"x-request-id": "trace-3"})
    spans = EXPORTER.get_finished_spans()
    servers = {s.attributes["helixagent.client_request_id"]: s for s in spans if s.kind == trace.SpanKind.SERVER}
    assert set(servers) == {"trace-1", "trace-2", "trace-3"}
    clients = [s for s in spans if s.kind == trace.SpanKind.CLIENT]
    by_parent: dict[int, list] = {}
    for s in clients:
        by_parent.setdefault(s.parent.span_id, []).append(s)
    one = by_parent[servers["trace-1"].context.span_id]
    assert [s.name for s in one] == ["chat openai"] and one[0].attributes["gen_ai.usage.output_tokens"] == 1
    two = by_parent[servers["trace-2"].context.span_id]
    assert [s.name for s in two] == ["chat.stream openai"] and two[0].attributes["helixagent.chunks"] >= 2
    three = sorted(by_parent[servers["trace-3"].context.span_id], key=lambda s: s.start_time)
    assert [s.name for s in three] == ["chat openai", "chat backup"]
    assert not three[0].status.is_ok and three[1].status.is_unset
    assert servers["trace-3"].attributes["helixagent.fallbacks"] == 1
    assert servers["trace-1"].attributes["http.response.status_code"] == 200
    assert all(s.end_time >= s.start_time for s in spans)


def test_tracing_disabled_makes_no_spans(make_gateway, fake_openai):
    EXPORTER.clear()
    gw = make_gateway({"providers": [fake_openai.provider(max_retries=0)]})
    openai.OpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0).chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "a"}])
    assert EXPORTER.get_finished_spans() == ()
    assert gw.app.services["observability"].tracing is None


def test_missing_packages_turn_tracing_off_with_one_info_log(monkeypatch, caplog):
    from helixagent.config import load_config_dict
    from helixagent.observability.tracing import setup_tracing
    real_import = builtins.__import__

    def no_otel(name, *a, **kw):
        if name.startswith("opentelemetry"):
            raise ImportError(name)
        return real_import(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_otel)
    with caplog.at_level(logging.INFO, logger="helixagent.tracing"):
        assert setup_tracing(load_config_dict({"tracing": {"enabled": True}})) is None
    msgs = [r for r in caplog.records if r.name == "helixagent.tracing"]
    assert len(msgs) == 1 and msgs[0].levelno == logging.INFO and "not installed" in msgs[0].getMessage()
