"""/metrics after known traffic: exact counter values, bounded label values, auth, the metrics port."""
from __future__ import annotations

import re

import httpx
import openai
import orjson
import pytest

from fakes.openai_upstream import Fault
from support.observability import FeatureStandIn, add_stage, label_values, parse_metrics, value
from support.servers import free_port, wait_until

MASTER = "hk-master-test-key-0123456789"


def client(gw, key="unused"):
    return openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0)


def scrape(gw, key=None):
    r = httpx.get(gw.url + "/metrics", headers={"authorization": f"Bearer {key}"} if key else {})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    return r.text


FREE = {"gpt-4o-mini": {"input_per_mtok": 0, "output_per_mtok": 0}}  # costs come only from the stand-in


def test_exact_counters_after_known_traffic(make_gateway, fake_openai):
    gw = make_gateway({"providers": [fake_openai.provider(max_retries=0, model_prices=FREE)]})
    add_stage(gw, FeatureStandIn())

    class Health:
        def availability(self, name):
            return 0.25

        def breaker_state(self, name):
            return "half_open"

    gw.app.services["health"] = Health()
    c = client(gw)
    prompt = completion = 0
    # 3 plain answers, each costing $0.25 (set by the stand-in record stage)
    for i in range(3):
        r = c.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": f"a b {i}"}],
                                      extra_headers={"x-test-cost": "0.25"})
        prompt += r.usage.prompt_tokens
        completion += r.usage.completion_tokens
    # 2 streams with usage
    for _ in range(2):
        chunks = list(c.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "x y z"}],
                                                stream=True, stream_options={"include_usage": True}))
        prompt += chunks[-1].usage.prompt_tokens
        completion += chunks[-1].usage.completion_tokens
    # a body that does not parse: reaches no provider
    r = httpx.post(gw.url + "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400
    # upstream failures: 500 -> 502 upstream_5xx, 429 -> 429 from upstream (not one of our rejections)
    fake_openai.push(Fault(status=500))
    with pytest.raises(openai.APIStatusError) as ei:
        c.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "boom"}])
    assert ei.value.status_code == 502
    fake_openai.push(Fault(status=429))
    with pytest.raises(openai.RateLimitError):
        c.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "slow down"}])
    # our own limits: 2 rate-limit rejections and 1 budget rejection
    for kind in ("rate", "rate", "budget"):
        with pytest.raises(openai.RateLimitError):
            c.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}],
                                      extra_headers={"x-test-reject": kind})
    # cache: 2 hits (answered without the upstream), 1 miss
    for st in ("hit", "hit", "miss"):
        r = c.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "q"}],
                                      extra_headers={"x-test-cache": st})
        prompt += r.usage.prompt_tokens
        completion += r.usage.completion_tokens

    m = parse_metrics(scrape(gw))
    ok = dict(provider="openai", model="gpt-4o-mini", endpoint="/v1/chat/completions", status="200")
    assert value(m, "helixagent_requests_total", **ok) == 3 + 2 + 3
    assert value(m, "helixagent_requests_total") == 3 + 2 + 1 + 1 + 1 + 3 + 3
    assert value(m, "helixagent_requests_total", provider="none", model="none", status="400") == 1
    assert value(m, "helixagent_requests_total", provider="openai", status="502") == 1
    assert value(m, "helixagent_requests_total", status="429") == 4
    assert value(m, "helixagent_request_duration_seconds_count", **ok) == 8
    assert value(m, "helixagent_request_duration_seconds_count") == 14
    assert value(m, "helixagent_tokens_used_total", type="prompt") == prompt
    assert value(m, "helixagent_tokens_used_total", type="completion") == completion
    assert prompt > 0 and completion > 0
    assert value(m, "helixagent_errors_total") == 1 + 1 + 1 + 3
    assert value(m, "helixagent_errors_total", kind="upstream_5xx", status="502") == 1
    assert value(m, "helixagent_errors_total", status="400", provider="none") == 1
    assert value(m, "helixagent_rate_limit_rejections_total", reason="rate_limit") == 2
    assert value(m, "helixagent_rate_limit_rejections_total", reason="budget") == 1
    assert value(m, "helixagent_rate_limit_rejections_total") == 3  # the upstream's 429 is not ours
    assert value(m, "helixagent_cache_requests_total", result="hit") == 2
    assert value(m, "helixagent_cache_requests_total", result="miss") == 1
    assert value(m, "helixagent_cost_dollars_total", provider="openai", model="gpt-4o-mini") == pytest.approx(0.75)
    assert value(m, "helixagent_time_to_first_token_seconds_count", provider="openai") == 2
    # upstream latency: every call that reached the upstream and answered (3 + 2 + cache miss)
    assert value(m, "helixagent_upstream_latency_seconds_count", provider="openai") == 6
    assert value(m, "helixagent_requests_in_flight") == 0
    assert value(m, "helixagent_provider_availability", provider="openai") == 0.25
    assert value(m, "helixagent_provider_breaker_state", provider="openai") == 1
    # no series for errors on successful requests
    assert value(m, "helixagent_errors_total", status="200") == 0
    assert not [k for k in m if k[0] == "helixagent_errors_total" and ("status", "200") in k[1]]


def test_label_values_come_from_configuration_only(make_gateway, fake_openai):
    gw = make_gateway({"providers": [fake_openai.provider(max_retries=0)]})
    c = client(gw)
    hostile = ["evil-model-" + str(i) for i in range(20)]
    for name in hostile:  # a client pinning the provider may name any model: the upstream answers
        c.chat.completions.create(model="openai/" + name, messages=[{"role": "user", "content": "a"}])
    for name in hostile[:5]:  # unknown models and providers are 404s
        with pytest.raises(openai.NotFoundError):
            c.chat.completions.create(model=name, messages=[{"role": "user", "content": "a"}])
        with pytest.raises(openai.NotFoundError):
            c.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "a"}],
                                      extra_body={"provider": "prov-" + name})
    # odd paths, methods and request ids
    httpx.post(gw.url + "/v1/chat/completions/extra", content=b"{}")
    httpx.post(gw.url + "/v1/chat/completions", content=b"[]", headers={"x-request-id": "rid-evil-1"})
    text = scrape(gw)
    assert "evil" not in text and "rid-evil" not in text
    m = parse_metrics(text)
    assert label_values(m, "provider") <= {"openai", "none", "other"}
    assert label_values(m, "model") <= {"gpt-4o-mini", "gpt-4o", "other", "none"}
    assert label_values(m, "endpoint") <= {"/v1/chat/completions", "/chat/completions", "/v1/completions",
                                           "/completions", "/v1/embeddings", "/embeddings", "other"}
    assert value(m, "helixagent_requests_total", provider="openai", model="other", status="200") == 20
    assert value(m, "helixagent_requests_total", status="404") == 10
    series = {(n, ls) for (n, ls) in m if n == "helixagent_requests_total"}
    assert len(series) <= 4


def test_metrics_auth_on_main_port_and_open_metrics_port(make_gateway, fake_openai):
    port = free_port()
    gw = make_gateway({"providers": [fake_openai.provider(max_retries=0)], "auth": {"master_key": MASTER},
                       "metrics": {"port": port}})
    assert httpx.get(gw.url + "/metrics").status_code == 401
    assert httpx.get(gw.url + "/metrics", headers={"authorization": "Bearer wrong"}).status_code == 401
    client(gw, MASTER).chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "a"}])
    m = parse_metrics(scrape(gw, MASTER))
    assert value(m, "helixagent_requests_total", model="gpt-4o", status="200") == 1
    # the separate port: open, same numbers
    assert wait_until(lambda: _ok(f"http://127.0.0.1:{port}/metrics"))
    r = httpx.get(f"http://127.0.0.1:{port}/metrics")
    assert value(parse_metrics(r.text), "helixagent_requests_total", model="gpt-4o", status="200") == 1
    assert httpx.get(f"http://127.0.0.1:{port}/other").status_code == 404


def test_metrics_path_and_disabled(make_gateway, fake_openai):
    gw = make_gateway({"providers": [fake_openai.provider(max_retries=0)], "metrics": {"path": "/internal/prom"}})
    assert httpx.get(gw.url + "/internal/prom").status_code == 200
    assert httpx.get(gw.url + "/metrics").status_code == 404
    gw2 = make_gateway({"providers": [fake_openai.provider(max_retries=0)], "metrics": {"enabled": False}})
    assert httpx.get(gw2.url + "/metrics").status_code == 404
    # requests are still served (and logged) without metrics
    r = client(gw2).chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "a"}])
    assert r.choices[0].message.content


def test_request_id_honoured_and_returned(make_gateway, fake_openai):
    gw = make_gateway({"providers": [fake_openai.provider(max_retries=0)]})
    r = httpx.post(gw.url + "/v1/chat/completions", headers={"x-request-id": "client-rid-42"},
                   content=orjson.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "a"}]}))
    assert r.status_code == 200 and r.headers["x-request-id"] == "client-rid-42"
    made = set()
    for _ in range(2):  # none given: one is made, different each time
        r = httpx.post(gw.url + "/v1/chat/completions",
                       content=orjson.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "a"}]}))
        assert re.fullmatch(r"[A-Za-z0-9._:\-]{8,128}", r.headers["x-request-id"])
        made.add(r.headers["x-request-id"])
    assert len(made) == 2


def _ok(url):
    try:
        return httpx.get(url).status_code == 200
    except httpx.HTTPError:
        return False


def test_labels_cached_per_raw_values_are_bounded_and_follow_a_reload():
    """Metrics.record resolves labels once per (provider, model, path, status) as the request has them: a
    flood of distinct model names stays bounded (all "other"), and a model a reload adds gets its own label."""
    from helixagent.app import create_app
    from helixagent.canonical import Usage
    from helixagent.config import load_config_dict
    from helixagent.pipeline import RequestContext

    def cfg(models):
        return load_config_dict({"providers": [{"name": "openai", "type": "openai", "api_key": "sk-test-0000000",
                                                "models": models}]})

    gw = create_app(cfg(["gpt-4o-mini"]))
    m = gw.services["metrics"]

    def ctx(model):
        c = RequestContext("chat")
        c.path, c.provider, c.upstream_model, c.status = "/v1/chat/completions", "openai", model, 200
        c.finished_at = c.started + 0.01
        c.usage = Usage(3, 4, 7)
        return c

    for i in range(m._RAW_MAX + 100):
        c = ctx(f"flood-{i}")
        assert m.record(c, c.latency) == "openai"
    assert len(m._raw) <= m._RAW_MAX
    c = ctx("gpt-4o-2")
    m.record(c, c.latency)
    m.reconfigure(create_app(cfg(["gpt-4o-mini", "gpt-4o-2"])))
    c = ctx("gpt-4o-2")
    m.record(c, c.latency)
    text = m.exposition().decode()
    n = m._RAW_MAX + 100 + 1
    assert f'helixagent_requests_total{{endpoint="/v1/chat/completions",model="other",provider="openai",status="200"}} {n}.0' in text
    assert 'helixagent_requests_total{endpoint="/v1/chat/completions",model="gpt-4o-2",provider="openai",status="200"} 1.0' in text
    assert 'helixagent_token_usage_total{model="gpt-4o-2",provider="openai",type="prompt"} 3.0' in text
    assert f'helixagent_token_usage_total{{model="other",provider="openai",type="completion"}} {4 * n}.0' in text
