"""An upstream that answers a streamed request with a plain JSON 200 (a whole completion, Message or
GenerateContentResponse, content-type application/json) is served as a stream, not retried.

Real HTTP end to end: the openai / anthropic SDKs stream from the gateway, whose providers call fake
upstreams (tests/fakes) told to answer the stream request with JSON (``Fault(json_answer=True)``)."""
from __future__ import annotations

from typing import Any

import anthropic
import httpx
import openai
import pytest

from fakes.anthropic_upstream import FakeAnthropic
from fakes.anthropic_upstream import Fault as AFault
from fakes.gemini_upstream import FakeGemini
from fakes.openai_upstream import FakeOpenAI, Fault

MSG = [{"role": "user", "content": "hello json world"}]
EXPECTED = "echo:hello echo:json echo:world"


@pytest.fixture
def gw(make_gateway: Any, fakes: tuple[FakeOpenAI, FakeAnthropic, FakeGemini]) -> Any:
    for f in fakes:
        f.reset()
    fo, fa, fg = fakes
    return make_gateway({"providers": [fo.provider("openai"), fa.provider("claude"), fg.provider("gemini")],
                         "routing": {"retries": {"max_attempts": 2, "backoff_base_ms": 10, "backoff_max_ms": 20}}})


def _openai_stream(gw: Any, model: str) -> tuple[str, list[Any]]:
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0)
    chunks = list(client.chat.completions.create(model=model, messages=MSG, stream=True,
                                                 stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks


@pytest.mark.parametrize("which,model", [(0, "gpt-4o-mini"), (1, "claude-3-5-haiku-latest"),
                                         (2, "gemini-2.0-flash")])
def test_json_answer_to_a_stream_is_served_as_a_stream(gw: Any, fakes: Any, which: int, model: str) -> None:
    fake = fakes[which]
    fake.push((Fault if which == 0 else AFault)(json_answer=True))
    text, chunks = _openai_stream(gw, model)
    assert text == EXPECTED
    assert len(fake.calls) == 1  # served, not retried
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["stop"]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1
    h = httpx.get(gw.url + "/health").json()["providers"]
    name = ("openai", "claude", "gemini")[which]
    assert h[name]["failures"] == 0 and h[name]["stream"]["cut"] == 0


def test_anthropic_sdk_streams_a_json_message(gw: Any, fakes: Any) -> None:
    fa = fakes[1]
    fa.push(AFault(json_answer=True))
    client = anthropic.Anthropic(base_url=gw.url, api_key="unused", max_retries=0)
    with client.messages.stream(model="claude-3-5-haiku-latest", max_tokens=64, messages=MSG) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    assert text == EXPECTED
    assert final.stop_reason == "end_turn" and final.usage.output_tokens == 3
    assert len(fa.calls) == 1


def test_json_error_body_with_200_is_an_upstream_error_not_a_stream(gw: Any, fakes: Any) -> None:
    fo = fakes[0]
    fo.push(Fault(status=200, body=b'{"error": {"message": "model overloaded", "type": "server_error"}}',
                  headers={"content-type": "application/json"}))
    text, _ = _openai_stream(gw, "gpt-4o-mini")
    assert text == "echo:hello echo:json echo:world"  # the first answer was an upstream error: retried
    assert len(fo.calls) == 2


def test_json_answer_that_is_not_a_completion_is_a_bad_body(gw: Any, fakes: Any) -> None:
    fo = fakes[0]
    fo.sticky = Fault(status=200, body=b'{"choices": "nope"}', headers={"content-type": "application/json"})
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.APIStatusError) as ei:
        list(client.chat.completions.create(model="gpt-4o-mini", messages=MSG, stream=True))
    assert ei.value.status_code == 502
    h = httpx.get(gw.url + "/health").json()["providers"]["openai"]
    assert h["last_error"] == "bad_upstream_body" and h["failures"] == 2  # the provider's: counted, retried
