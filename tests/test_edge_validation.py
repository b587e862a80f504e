"""Client input is validated once, at the edge: each bullet of issue 13's "Client input" list, over real
HTTP, against a gateway with token and cost limits (so the token estimator runs) and a virtual key."""
from __future__ import annotations

from typing import Any

import httpx
import pytest

from support.keys import MASTER

MODEL = "mock-1"
LIMITS = {"auth": {"master_key": MASTER},
          "providers": [{"name": "mock", "type": "mock"}],  # asked for explicitly: not a stand-in, /health ok
          "routing": {"max_cost_per_request": 10.0},
          "rate_limits": {"api_key": {"requests_per_minute": 100000, "tokens_per_minute": 10**9},
                          "user": {"tokens_per_day": 10**9}, "cost": {"api_key": {"per_day": 1000.0}},
                          # the mock model has no catalogue price: count it at a default one, so the
                          # dollar-budget path (price estimate, reservation, settlement) runs on every request
                          "unknown_price": "default", "default_price_per_mtok": {"input": 1.0, "output": 2.0}}}


@pytest.fixture(scope="module")
def edge(tmp_path_factory: Any) -> Any:
    from support.servers import GatewayServer
    d = tmp_path_factory.mktemp("edge")
    gw = GatewayServer({**LIMITS, "database": {"url": f"sqlite:///{d}/h.db", "spool_dir": str(d / "spool")}})
    c = httpx.Client(base_url=gw.url, timeout=10)
    r = c.post("/admin/keys", json={"user_id": "edge", "role": "user"}, headers={"authorization": f"Bearer {MASTER}"})
    assert r.status_code == 201, r.text
    c.headers["authorization"] = f"Bearer {r.json()['key']}"
    yield gw, c
    c.close()
    gw.close()


def _openai_400(r: httpx.Response, param: str) -> None:
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error" and err["param"] == param, err
    assert param in err["message"]


def _anthropic_400(r: httpx.Response, path: str) -> None:
    assert r.status_code == 400, r.text
    b = r.json()
    assert b["type"] == "error" and b["error"]["type"] == "invalid_request_error", b
    assert b["error"]["message"].startswith(path), b


def _chat(c: httpx.Client, messages: Any, **kw: Any) -> httpx.Response:
    return c.post("/v1/chat/completions", json={"model": MODEL, "messages": messages, **kw})


def test_unhashable_role_is_a_400(edge: Any) -> None:
    _, c = edge
    _openai_400(_chat(c, [{"role": {}, "content": "x"}]), "messages[0].role")
    _openai_400(_chat(c, [{"role": ["user"], "content": "x"}]), "messages[0].role")


def test_text_part_with_a_number_is_a_400_not_a_crash_of_the_token_estimator(edge: Any) -> None:
    _, c = edge
    _openai_400(_chat(c, [{"role": "user", "content": [{"type": "text", "text": 5}]}]), "messages[0].content[0].text")
    r = _chat(c, [{"role": "user", "content": [{"type": "text", "text": "ok"}, {"type": "text", "text": 5}]}])
    _openai_400(r, "messages[0].content[1].text")


def test_tool_calls_not_a_list_is_a_400(edge: Any) -> None:
    _, c = edge
    r = _chat(c, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": "x"}])
    _openai_400(r, "messages[1].tool_calls")
    r = _chat(c, [{"role": "user", "content": "hi"},
                  {"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {"name": 1}}]}])
    _openai_400(r, "messages[1].tool_calls[0].function.name")


@pytest.mark.parametrize("parts,param", [([1, "x", None], "messages[0].content[0]"),
                                         ([{"type": "text", "text": "a"}, "x"], "messages[0].content[1]"),
                                         ([{"type": "bogus"}], "messages[0].content[0].type"),
                                         ([{"type": "image_url", "image_url": {"url": 5}}],
                                          "messages[0].content[0].image_url.url")])
def test_bad_content_parts_are_400_not_forwarded(edge: Any, parts: Any, param: str) -> None:
    _, c = edge
    _openai_400(_chat(c, [{"role": "user", "content": parts}]), param)


@pytest.mark.parametrize("extra,param", [({"tools": "x"}, "tools"), ({"tools": [{"type": "function"}]}, "tools[0].function"),
                                         ({"tool_choice": 5}, "tool_choice"), ({"stop": [1]}, "stop[0]"),
                                         ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
                                         ({"reasoning_effort": {}}, "reasoning_effort"),
                                         ({"max_tokens": 1e308}, "max_tokens"), ({"n": True}, "n")])
def test_bad_parameters_are_400(edge: Any, extra: dict[str, Any], param: str) -> None:
    _, c = edge
    _openai_400(_chat(c, [{"role": "user", "content": "x"}], **extra), param)


def test_every_type_the_reference_allows_is_accepted_and_unknown_fields_pass_through(
        make_gateway: Any, fake_openai: Any) -> None:
    gw = make_gateway({"providers": [fake_openai.provider()]})
    body = {"model": "gpt-4o-mini", "stop": "x", "tool_choice": {"type": "function", "function": {"name": "f"}},
            "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
            "response_format": {"type": "json_object"}, "stream_options": None, "seed": -5, "logit_bias": {"1": -100},
            "messages": [{"role": "developer", "content": [{"type": "text", "text": "be brief"}]},
                         {"role": "user", "content": [{"type": "text", "text": "hi"},
                                                      {"type": "image_url", "image_url": {"url": "https://x/a.png",
                                                                                          "detail": "original"}}]},
                         {"role": "assistant", "content": None, "tool_calls": [
                             {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
                         {"role": "tool", "tool_call_id": "c1", "content": [{"type": "text", "text": "done"}]}],
            "some_future_field": {"nested": [1, 2]}}
    r = httpx.post(gw.url + "/v1/chat/completions", json=body, timeout=10)
    assert r.status_code == 200, r.text
    sent = fake_openai.calls[-1]["body"]
    assert sent["some_future_field"] == {"nested": [1, 2]}
    assert sent["messages"][1]["content"][1]["image_url"]["detail"] == "original"
    for stop in (["a", "b"], None):
        r = httpx.post(gw.url + "/v1/chat/completions", timeout=10,
                       json={"model": "gpt-4o-mini", "stop": stop, "messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 200, r.text


def test_anthropic_image_media_type_object_is_a_400(edge: Any) -> None:
    _, c = edge
    r = c.post("/v1/messages", json={"model": MODEL, "max_tokens": 10, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": {}, "data": "aa"}}]}]})
    _anthropic_400(r, "messages.0.content.0.source.media_type")
    r = c.post("/v1/messages/count_tokens", json={"model": MODEL, "messages": [{"role": "user", "content": [
        {"type": "text", "text": 5}]}]})
    _anthropic_400(r, "messages.0.content.0.text")


@pytest.mark.parametrize("extra,param,says", [
    ({"temperature": 2.5}, "temperature", "less than or equal to 2"),
    ({"temperature": -0.5}, "temperature", "greater than or equal to 0"),
    ({"top_p": 1.5}, "top_p", "less than or equal to 1"),
    ({"top_p": 2}, "top_p", "less than or equal to 1"),
    ({"temperature": "hot"}, "temperature", "must be a number"),
    ({"max_tokens": 1.5}, "max_tokens", "must be an integer"),
])
def test_a_number_out_of_range_says_so_not_that_it_must_be_an_integer(
        edge: Any, extra: dict[str, Any], param: str, says: str) -> None:
    """An int-or-float parameter out of range: the 400 names the bound, not the int member's type error."""
    _, c = edge
    r = _chat(c, [{"role": "user", "content": "x"}], **extra)
    _openai_400(r, param)
    assert says in r.json()["error"]["message"], r.json()
    if param != "max_tokens":
        anth = {"temperature": 1.5} if param == "temperature" and "less" in says else extra
        r = c.post("/v1/messages", json={"model": MODEL, "max_tokens": 10, **anth,
                                         "messages": [{"role": "user", "content": "x"}]})
        _anthropic_400(r, param)
        want = "less than or equal to 1" if "less" in says else says
        assert want in r.json()["error"]["message"], r.json()


@pytest.mark.parametrize("expires_in", [1e308, "99999999999d", -1, True, {}])
def test_admin_expires_in_out_of_range_is_a_400(edge: Any, expires_in: Any) -> None:
    gw, _ = edge
    r = httpx.post(gw.url + "/admin/keys", json={"user_id": "u", "expires_in": expires_in},
                   headers={"authorization": f"Bearer {MASTER}"}, timeout=10)
    _openai_400(r, "expires_in")


def test_admin_expires_at_at_the_calendar_edge_is_a_400(edge: Any) -> None:
    gw, _ = edge
    r = httpx.post(gw.url + "/admin/keys", json={"user_id": "u", "expires_at": "0001-01-01T00:00:00+01:00"},
                   headers={"authorization": f"Bearer {MASTER}"}, timeout=10)
    _openai_400(r, "expires_at")


@pytest.mark.parametrize("qs,param", [("from=0001-01-01&to=9999-12-31", "from"), ("to=0001-01-01", None),
                                      ("from=99999999999999999999", "from"), ("group_by=x", "group_by"),
                                      ("from=1e400", "from")])
def test_usage_dates_at_the_calendar_edges_are_400(edge: Any, qs: str, param: str | None) -> None:
    gw, _ = edge
    r = httpx.get(gw.url + "/v1/usage?" + qs, headers={"authorization": f"Bearer {MASTER}"}, timeout=10)
    assert r.status_code in (200, 400), r.text
    if param is None:
        assert r.status_code == 200, r.text   # the 30 days before year 1 Jan 2 are clamped, not an overflow
    else:
        _openai_400(r, param)


def test_gateway_is_healthy_after(edge: Any) -> None:
    gw, c = edge
    r = _chat(c, [{"role": "user", "content": "still there?"}])
    assert r.status_code == 200, r.text
    assert httpx.get(gw.url + "/health", timeout=10).json()["status"] == "ok"
