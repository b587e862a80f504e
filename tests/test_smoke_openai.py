import openai
import orjson
from openai.types.chat import ChatCompletion


def client(gw, **kw):
    return openai.OpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0, **kw)


def test_chat_non_stream(gateway, fake_openai):
    c = client(gateway)
    raw = c.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hello there"}])
    assert raw.headers["x-helixagent-provider"] == "openai"
    resp = raw.parse()
    ChatCompletion.model_validate(orjson.loads(raw.content))
    assert resp.choices[0].message.content == "echo:hello echo:there"
    assert resp.usage.total_tokens > 0
    assert fake_openai.calls[0]["body"]["model"] == "gpt-4o-mini"


def test_chat_stream(gateway):
    c = client(gateway)
    chunks = list(c.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "a b c"}],
                                            stream=True, stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == "echo:a echo:b echo:c"
    assert chunks[-1].usage is not None and chunks[-1].choices == []
