"""Response cache and in-flight de-duplication over real HTTP, with both backends (memory and the test
machine's real Redis), the fake OpenAI upstream counting upstream calls, and the openai SDK types
validating every answer and chunk."""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

import httpx
import openai
import orjson
import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from conftest import need_redis
from fakes.openai_upstream import Fault
from helixagent.pipeline import Stage
from support.servers import wait_until

URL = "/v1/chat/completions"
TOOLS = [{"type": "function", "function": {"name": "lookup", "description": "look up",
                                            "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}}]


def msgs(text: str = "hello cached world") -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


def body(text: str = "hello cached world", **kw: Any) -> dict[str, Any]:
    return {"model": "gpt-4o-mini", "messages": msgs(text), "temperature": 0, **kw}


@pytest.fixture(params=["memory", "redis"])
def backend(request: Any) -> Any:
    """Yields a function building the `cache:` section for this backend; Redis keys get a unique prefix
    per test and are deleted afterwards (other engineers share the server)."""
    kind = request.param
    prefix = f"helixtest:cache:{uuid.uuid4().hex}:"
    url = need_redis() if kind == "redis" else None

    def make(**kw: Any) -> dict[str, Any]:
        c = {"enabled": True, "type": kind, **kw}
        if kind == "redis":
            c.setdefault("redis_url", url)
            c["key_prefix"] = prefix
            c.setdefault("redis_timeout", "3s")  # correctness tests: no spurious timeouts on a loaded CI host
        return c

    make.kind = kind  # type: ignore[attr-defined]
    yield make
    if url:
        import redis
        r = redis.Redis.from_url(url)
        keys = list(r.scan_iter(match=prefix + "*", count=1000))
        if keys:
            r.delete(*keys)
        r.close()


@pytest.fixture
def cached_gw(make_gateway: Any, fake_openai: Any, backend: Any) -> Any:
    def make(**cache: Any) -> Any:
        return make_gateway({"providers": [fake_openai.provider()], "cache": backend(**cache)})
    return make


def post(gw: Any, data: dict[str, Any], headers: dict[str, str] | None = None, path: str = URL) -> httpx.Response:
    return httpx.post(gw.url + path, json=data, headers=headers or {}, timeout=20)


def sse(resp: httpx.Response) -> tuple[list[dict[str, Any]], bool]:
    out, done = [], False
    for line in resp.iter_lines():
        if not line.startswith("data: "):
            continue
        if line[6:] == "[DONE]":
            done = True
            continue
        assert not done, "data after [DONE]"
        out.append(json.loads(line[6:]))
    return out, done


def stream_text(chunks: list[dict[str, Any]]) -> str:
    for c in chunks:
        ChatCompletionChunk.model_validate(c)
    return "".join((ch["delta"].get("content") or "") for c in chunks for ch in c["choices"])


# -- de-duplication ----------------------------------------------------------------------------------

async def _burst(gw: Any, bodies: list[dict[str, Any]]) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=len(bodies) + 5, max_keepalive_connections=len(bodies) + 5)
    async with httpx.AsyncClient(base_url=gw.url, timeout=30, limits=limits) as c:
        return await asyncio.gather(*(c.post(URL, json=b) for b in bodies))


async def test_100_identical_concurrent_requests_make_one_upstream_call(cached_gw: Any, fake_openai: Any) -> None:
    gw = cached_gw()
    fake_openai.push(Fault(delay=0.3))  # the first (only) upstream call is slow: the others overlap it
    rs = await _burst(gw, [body("same question for all")] * 100)
    assert len(fake_openai.calls) == 1
    assert all(r.status_code == 200 for r in rs)
    statuses = [r.headers["x-helixagent-cache"] for r in rs]
    assert statuses.count("MISS") == 1 and statuses.count("HIT") == 99
    answers = {r.json()["choices"][0]["message"]["content"] for r in rs}
    assert answers == {"echo:same echo:question echo:for echo:all"}
    for r in rs:
        ChatCompletion.model_validate(r.json())
    svc = gw.app.services["cache"]
    assert svc.hits == 99 and svc.misses == 1
    assert svc.inflight == {}


async def test_100_different_concurrent_requests_make_100_upstream_calls(cached_gw: Any, fake_openai: Any) -> None:
    gw = cached_gw()
    fake_openai.push(Fault(delay=0.3))
    rs = await _burst(gw, [body(f"question number {i}") for i in range(100)])
    assert len(fake_openai.calls) == 100
    for i, r in enumerate(rs):
        assert r.status_code == 200 and r.headers["x-helixagent-cache"] == "MISS"
        assert r.json()["choices"][0]["message"]["content"] == f"echo:question echo:number echo:{i}"
    assert gw.app.services["cache"].misses == 100


async def test_leader_failure_gives_followers_the_same_error(cached_gw: Any, fake_openai: Any) -> None:
    gw = cached_gw()
    # a generous delay: every request must arrive while the leader is still waiting
    fake_openai.push(Fault(delay=1.0, status=400, message="the leader's request was refused"))
    rs = await _burst(gw, [body("doomed")] * 20)
    assert len(fake_openai.calls) == 1
    errs = [r.json() for r in rs]
    assert all(r.status_code == 400 for r in rs)
    assert all("the leader's request was refused" in e["error"]["message"] for e in errs)
    assert len({json.dumps(e, sort_keys=True) for e in errs}) == 1
    # nothing was stored: the next request goes upstream and succeeds
    r = post(gw, body("doomed"))
    assert r.status_code == 200 and r.headers["x-helixagent-cache"] == "MISS"
    assert len(fake_openai.calls) == 2
    assert gw.app.services["cache"].inflight == {}


async def test_stream_dedup_late_joiners_get_chunks_so_far_then_live(cached_gw: Any, fake_openai: Any) -> None:
    gw = cached_gw()
    fake_openai.push(Fault(chunk_delay=0.12))
    data = body("one two three four five", stream=True, stream_options={"include_usage": True})
    async with httpx.AsyncClient(base_url=gw.url, timeout=30) as c:
        async with c.stream("POST", URL, json=data) as leader:
            assert leader.headers["x-helixagent-cache"] == "MISS"
            lines = leader.aiter_lines()
            got: list[str] = []
            while len([x for x in got if x.startswith("data: ")]) < 2:  # the leader is mid-stream
                got.append(await lines.__anext__())

            async def join_stream(with_usage: bool) -> tuple[str, list[dict[str, Any]], bool]:
                d = dict(data)
                if not with_usage:
                    d.pop("stream_options")
                async with c.stream("POST", URL, json=d) as r:
                    text = ""
                    async for line in r.aiter_lines():
                        text += line + "\n"
                    return r.headers["x-helixagent-cache"], *sse(httpx.Response(200, content=text.encode()))

            async def join_plain() -> httpx.Response:
                d = dict(data)
                d.pop("stream")
                d.pop("stream_options")
                return await c.post(URL, json=d)

            late = [asyncio.ensure_future(join_stream(True)), asyncio.ensure_future(join_stream(False)),
                    asyncio.ensure_future(join_plain())]
            async for line in lines:
                got.append(line)
            results = await asyncio.gather(*late)
    assert len(fake_openai.calls) == 1
    lead_chunks, lead_done = sse(httpx.Response(200, content="\n".join(got).encode()))
    want = "echo:one echo:two echo:three echo:four echo:five"
    assert lead_done and stream_text(lead_chunks) == want
    for status, chunks, done in results[:2]:
        assert status == "HIT" and done
        assert stream_text(chunks) == want
        assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "stop"
    with_usage, without_usage = results[0][1], results[1][1]
    assert with_usage[-1]["choices"] == [] and with_usage[-1]["usage"]["total_tokens"] > 0
    assert all(not c.get("usage") for c in without_usage)
    plain = results[2]
    assert plain.headers["x-helixagent-cache"] == "HIT"
    ChatCompletion.model_validate(plain.json())
    assert plain.json()["choices"][0]["message"]["content"] == want
    # and it was stored once complete
    r = post(gw, body("one two three four five"))
    assert r.headers["x-helixagent-cache"] == "HIT" and len(fake_openai.calls) == 1


async def test_stream_follower_survives_the_leaders_client_going_away(cached_gw: Any, fake_openai: Any) -> None:
    gw = cached_gw()
    fake_openai.push(Fault(chunk_delay=0.12))
    data = body("alpha beta gamma delta", stream=True)
    async with httpx.AsyncClient(base_url=gw.url, timeout=30) as c:
        leader_cm = c.stream("POST", URL, json=data)
        leader = await leader_cm.__aenter__()
        lines = leader.aiter_lines()
        n = 0
        while n < 2:
            if (await lines.__anext__()).startswith("data: "):
                n += 1
        follower = asyncio.ensure_future(c.post(URL, json=data))
        svc = gw.app.services["cache"]
        for _ in range(500):  # until the follower is attached to the leader's stream
            if svc.stats.coalesced:
                break
            await asyncio.sleep(0.01)
        assert svc.stats.coalesced == 1
        await leader_cm.__aexit__(None, None, None)  # the leader's client disconnects mid-stream
        r = await follower
    chunks, done = sse(r)
    assert done and stream_text(chunks) == "echo:alpha echo:beta echo:gamma echo:delta"
    assert len(fake_openai.calls) == 1


async def test_stream_leader_failure_reaches_followers_and_is_not_stored(cached_gw: Any, fake_openai: Any) -> None:
    gw = cached_gw()
    fake_openai.push(Fault(cut_after=3, chunk_delay=0.3))
    data = body("a b c d e", stream=True)
    async with httpx.AsyncClient(base_url=gw.url, timeout=30) as c:
        rs = await asyncio.gather(*(c.post(URL, json=data) for _ in range(5)))
    assert len(fake_openai.calls) == 1
    errors = []
    for r in rs:
        events = [json.loads(ln[6:]) for ln in r.text.splitlines() if ln.startswith("data: ") and ln != "data: [DONE]"]
        assert "data: [DONE]" not in r.text
        assert "error" in events[-1]
        errors.append(events[-1])
    assert len({json.dumps(e, sort_keys=True) for e in errors}) == 1
    r = post(gw, body("a b c d e"))
    assert r.status_code == 200 and r.headers["x-helixagent-cache"] == "MISS"
    assert len(fake_openai.calls) == 2


# -- the key ---------------------------------------------------------------------------------------------

def test_answer_changing_fields_never_share_an_entry(cached_gw: Any, fake_openai: Any) -> None:
    gw = cached_gw()
    base = body("key test")
    variants = [
        {}, {"model": "gpt-4o"}, {"messages": msgs("key test!")},
        {"messages": [{"role": "system", "content": "be brief"}] + msgs("key test")},
        {"tools": TOOLS}, {"tools": TOOLS, "tool_choice": "none"}, {"response_format": {"type": "json_object"}},
        {"temperature": 0, "top_p": 0.5}, {"max_tokens": 1}, {"max_tokens": 2}, {"stop": ["x"]}, {"seed": 1},
        {"seed": 2}, {"n": 2}, {"logprobs": True}, {"presence_penalty": 0.5}, {"frequency_penalty": 0.5},
        {"logit_bias": {"50256": -100}}, {"parallel_tool_calls": False}, {"some_future_param": 1},
    ]
    for v in variants:
        r = post(gw, {**base, **v})
        assert r.status_code == 200, r.text
        assert r.headers["x-helixagent-cache"] == "MISS", v
    assert len(fake_openai.calls) == len(variants)
    # the legacy completion endpoint with the same text is a different entry too
    r = post(gw, {"model": "gpt-4o-mini", "prompt": "key test", "temperature": 0}, path="/v1/completions")
    assert r.headers["x-helixagent-cache"] == "MISS"
    Completion.model_validate(r.json())
    r = post(gw, {"model": "gpt-4o-mini", "prompt": "key test", "temperature": 0}, path="/v1/completions")
    assert r.headers["x-helixagent-cache"] == "HIT"
    Completion.model_validate(r.json())


def test_key_order_whitespace_and_non_answer_fields_share_an_entry(cached_gw: Any, fake_openai: Any) -> None:
    gw = cached_gw()
    first = b'{"model":"gpt-4o-mini","temperature":0,"max_tokens":50,"messages":[{"role":"user","content":"share me"}]}'
    same = [
        b'{ "messages" : [ { "content" : "share me" , "role" : "user" } ] ,\n "max_tokens": 50, "temperature": 0.0,'
        b' "model": "gpt-4o-mini" }',
        b'{"model":"openai/gpt-4o-mini","temperature":0,"max_tokens":50,"messages":[{"role":"user","content":"share me"}],'
        b'"user":"someone-else","metadata":{"tag":"x"},"store":false}',
        b'{"model":"gpt-4o-mini","temperature":0,"max_tokens":50,"messages":[{"role":"user","content":"share me"}],'
        b'"provider":"openai","stream":false}',
    ]
    r = httpx.post(gw.url + URL, content=first, headers={"content-type": "application/json"})
    assert r.headers["x-helixagent-cache"] == "MISS"
    for raw in same:
        r = httpx.post(gw.url + URL, content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 200, r.text
        assert r.headers["x-helixagent-cache"] == "HIT", raw
        ChatCompletion.model_validate(r.json())
    assert len(fake_openai.calls) == 1


# -- per-request control ---------------------------------------------------------------------------

def test_cache_control_and_the_cache_field(cached_gw: Any, fake_openai: Any) -> None:
    gw = cached_gw()
    r1 = post(gw, body("control"))
    assert r1.headers["x-helixagent-cache"] == "MISS"
    assert post(gw, body("control")).headers["x-helixagent-cache"] == "HIT"
    # no-cache: skip the lookup, go upstream, refresh the entry
    r2 = post(gw, body("control"), {"cache-control": "no-cache"})
    assert r2.headers["x-helixagent-cache"] == "BYPASS" and len(fake_openai.calls) == 2
    assert r2.json()["id"] != r1.json()["id"]
    r3 = post(gw, body("control"))
    assert r3.headers["x-helixagent-cache"] == "HIT" and r3.json()["id"] == r2.json()["id"]
    # no-store: served (from the cache, even) but a fresh answer is never written
    r4 = post(gw, body("store nothing"), {"cache-control": "no-store"})
    assert r4.headers["x-helixagent-cache"] == "MISS"
    assert post(gw, body("store nothing")).headers["x-helixagent-cache"] == "MISS"
    assert post(gw, body("control"), {"cache-control": "no-store"}).headers["x-helixagent-cache"] == "HIT"
    n = len(fake_openai.calls)
    # "cache": false -> neither looked up nor stored
    r5 = post(gw, {**body("control"), "cache": False})
    assert r5.headers["x-helixagent-cache"] == "BYPASS" and len(fake_openai.calls) == n + 1
    assert "cache" not in fake_openai.calls[-1]["body"]
    r6 = post(gw, {**body("fresh only"), "cache": False})
    assert post(gw, body("fresh only")).headers["x-helixagent-cache"] == "MISS"
    assert r6.status_code == 200
    # a malformed field is the client's error, in OpenAI's shape
    bad = post(gw, {**body("control"), "cache": "yes"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "cache"


def test_non_deterministic_requests_are_not_cached_unless_asked(cached_gw: Any, fake_openai: Any) -> None:
    gw = cached_gw()
    for b in ({"model": "gpt-4o-mini", "messages": msgs("sampled")},                   # unset = 1
              {"model": "gpt-4o-mini", "messages": msgs("sampled"), "temperature": 0.7}):
        assert post(gw, b).headers["x-helixagent-cache"] == "BYPASS"
        assert post(gw, b).headers["x-helixagent-cache"] == "BYPASS"
    assert len(fake_openai.calls) == 4
    opt_in = {"model": "gpt-4o-mini", "messages": msgs("sampled"), "temperature": 0.7, "cache": True}
    assert post(gw, opt_in).headers["x-helixagent-cache"] == "MISS"
    assert post(gw, opt_in).headers["x-helixagent-cache"] == "HIT"


def test_cache_nonzero_temperature_policy(cached_gw: Any, fake_openai: Any) -> None:
    gw = cached_gw(cache_nonzero_temperature=True)
    b = {"model": "gpt-4o-mini", "messages": msgs("sampled anyway")}
    assert post(gw, b).headers["x-helixagent-cache"] == "MISS"
    assert post(gw, b).headers["x-helixagent-cache"] == "HIT"
    assert post(gw, {**b, "temperature": 1.2}).headers["x-helixagent-cache"] == "MISS"  # still in the key


# -- expiry and bounds -------------------------------------------------------------------------------------

def test_ttl_expiry(cached_gw: Any, fake_openai: Any) -> None:
    gw = cached_gw(ttl="400ms")
    assert post(gw, body("short lived")).headers["x-helixagent-cache"] == "MISS"
    assert post(gw, body("short lived")).headers["x-helixagent-cache"] == "HIT"
    time.sleep(0.6)
    assert post(gw, body("short lived")).headers["x-helixagent-cache"] == "MISS"
    assert len(fake_openai.calls) == 2


def test_lru_eviction_by_count(make_gateway: Any, fake_openai: Any) -> None:
    gw = make_gateway({"providers": [fake_openai.provider()], "cache": {"enabled": True, "max_size": 2}})
    for t in ("a", "b"):
        assert post(gw, body(t)).headers["x-helixagent-cache"] == "MISS"
    assert post(gw, body("a")).headers["x-helixagent-cache"] == "HIT"      # a is now most recent
    assert post(gw, body("c")).headers["x-helixagent-cache"] == "MISS"     # evicts b, the least recent
    assert post(gw, body("a")).headers["x-helixagent-cache"] == "HIT"
    assert post(gw, body("b")).headers["x-helixagent-cache"] == "MISS"
    svc = gw.app.services["cache"]
    assert svc.evictions == 2 and svc.stats.entries == 2


def test_lru_eviction_by_bytes() -> None:
    from helixagent.cache import CacheStats, MemoryBackend
    st = CacheStats()
    m = MemoryBackend(max_size=100, max_bytes=250, stats=st)
    assert m.set_now("a", b"x" * 100, 60) and m.set_now("b", b"y" * 100, 60)
    assert m.get_now("a") == b"x" * 100          # touch a: b is now the LRU entry
    assert m.set_now("c", b"z" * 100, 60)         # 300 > 250 bytes -> b goes
    assert m.get_now("b") is None and m.get_now("a") and m.get_now("c")
    assert st.evictions == 1 and st.bytes == 200 and st.entries == 2
    assert not m.set_now("huge", b"h" * 251, 60)  # larger than the whole cache: refused, nothing evicted
    assert st.entries == 2 and st.evictions == 1
    assert m.set_now("a", b"x" * 50, 60) and st.bytes == 150  # replacing an entry adjusts the size
    assert m.set_now("e", b"e" * 1, -1) and m.get_now("e") is None and st.expirations == 1


# -- streaming <-> non-streaming ---------------------------------------------------------------------

def test_non_stream_entry_serves_a_stream(cached_gw: Any, fake_openai: Any) -> None:
    gw = cached_gw()
    c = openai.OpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0)
    raw = c.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=msgs("cross serve"),
                                                      temperature=0)
    assert raw.headers["x-helixagent-cache"] == "MISS"
    first = ChatCompletion.model_validate(orjson.loads(raw.content))
    r = httpx.post(gw.url + URL, json=body("cross serve", stream=True, stream_options={"include_usage": True}))
    assert r.headers["x-helixagent-cache"] == "HIT"
    assert r.headers["content-type"].startswith("text/event-stream")
    chunks, done = sse(r)
    assert done and stream_text(chunks) == first.choices[0].message.content
    assert chunks[-1]["usage"] == first.usage.model_dump(exclude_none=True)
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    # through the SDK's own stream parser too
    sdk = list(c.chat.completions.create(model="gpt-4o-mini", messages=msgs("cross serve"), temperature=0,
                                         stream=True))
    assert "".join(x.choices[0].delta.content or "" for x in sdk if x.choices) == first.choices[0].message.content
    assert all(x.usage is None for x in sdk)
    assert len(fake_openai.calls) == 1


def test_stream_entry_serves_a_non_stream_request_and_tool_calls_replay(cached_gw: Any, fake_openai: Any) -> None:
    gw = cached_gw()
    r = httpx.post(gw.url + URL, json=body("streamed first", stream=True))
    assert r.headers["x-helixagent-cache"] == "MISS"
    chunks, done = sse(r)
    assert done
    r2 = post(gw, body("streamed first"))
    assert r2.headers["x-helixagent-cache"] == "HIT"
    cc = ChatCompletion.model_validate(r2.json())
    assert cc.choices[0].message.content == stream_text(chunks) == "echo:streamed echo:first"
    assert cc.choices[0].finish_reason == "stop" and cc.usage.total_tokens > 0
    # a tool-call answer cached from a stream replays as tool-call deltas and as a message
    tb = body("use the tool", tools=TOOLS)
    sr = httpx.post(gw.url + URL, json={**tb, "stream": True})
    assert sr.headers["x-helixagent-cache"] == "MISS"
    hit = post(gw, tb).json()
    call = ChatCompletion.model_validate(hit).choices[0].message.tool_calls[0]
    assert call.function.name == "lookup" and json.loads(call.function.arguments) == {"q": "use the tool"}
    rs = httpx.post(gw.url + URL, json={**tb, "stream": True})
    assert rs.headers["x-helixagent-cache"] == "HIT"
    chunks, done = sse(rs)
    for ch in chunks:
        ChatCompletionChunk.model_validate(ch)
    deltas = [d for ch in chunks for c in ch["choices"] for d in (c["delta"].get("tool_calls") or [])]
    assert deltas[0]["function"]["name"] == "lookup"
    assert json.loads("".join(d["function"]["arguments"] for d in deltas)) == {"q": "use the tool"}
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert len(fake_openai.calls) == 2


def test_cut_stream_is_not_stored(cached_gw: Any, fake_openai: Any) -> None:
    gw = cached_gw()
    fake_openai.push(Fault(cut_after=3))
    r = httpx.post(gw.url + URL, json=body("w1 w2 w3 w4", stream=True))
    assert "data: [DONE]" not in r.text
    r = post(gw, body("w1 w2 w3 w4"))
    assert r.headers["x-helixagent-cache"] == "MISS" and len(fake_openai.calls) == 2


# -- usage / pipeline contract -------------------------------------------------------------------------

class Spy(Stage):
    """A stage placed before the cache (where limits and record sit) that sees the outcome."""
    name = "spy"

    def __init__(self) -> None:
        self.seen: list[tuple[Any, ...]] = []

    async def post(self, ctx: Any) -> None:
        self.seen.append((ctx.cache_status, ctx.provider, ctx.usage and ctx.usage.total_tokens,
                          ctx.error is None))


def test_hits_report_cache_status_provider_and_original_usage(cached_gw: Any, fake_openai: Any) -> None:
    gw = cached_gw()
    spy = Spy()
    gw.app.chat_pipeline.stages.insert(0, spy)
    a = post(gw, body("usage contract")).json()
    b = post(gw, body("usage contract")).json()
    s = httpx.post(gw.url + URL, json=body("usage contract", stream=True))
    assert s.status_code == 200
    post(gw, {**body("usage contract"), "temperature": 0.5})
    total = a["usage"]["total_tokens"]
    assert b["usage"] == a["usage"] and b["provider"] == "openai"
    assert spy.seen == [("MISS", "openai", total, True), ("HIT", "openai", total, True),
                        ("HIT", "openai", total, True), ("BYPASS", "openai", total, True)]
    assert len(fake_openai.calls) == 2
    snap = gw.app.services["cache"].snapshot()
    assert (snap["hits"], snap["misses"], snap["bypasses"], snap["stores"]) == (2, 1, 1, 1)


def test_cache_disabled_adds_nothing(gateway: Any, fake_openai: Any) -> None:
    r = post(gateway, body("no cache configured"))
    assert "x-helixagent-cache" not in r.headers and "cache" not in gateway.app.services
    post(gateway, body("no cache configured"))
    assert len(fake_openai.calls) == 2


def test_global_scope_and_embeddings_untouched(cached_gw: Any, fake_openai: Any) -> None:
    gw = cached_gw(scope="global")
    assert post(gw, body("global")).headers["x-helixagent-cache"] == "MISS"
    assert post(gw, body("global")).headers["x-helixagent-cache"] == "HIT"
    e = httpx.post(gw.url + "/v1/embeddings", json={"model": "gpt-4o-mini", "input": "x"})
    assert e.status_code == 200 and "x-helixagent-cache" not in e.headers


# -- Redis outages ------------------------------------------------------------------------------------

def test_redis_down_serves_without_cache_counts_and_logs_once_per_outage(make_gateway: Any, fake_openai: Any,
                                                                          caplog: Any, tmp_path: Any) -> None:
    import logging
    import subprocess

    import redis

    from support.servers import free_port
    caplog.set_level(logging.WARNING, logger="helixagent.cache")
    port = free_port()
    gw = make_gateway({"providers": [fake_openai.provider()],
                       "cache": {"enabled": True, "type": "redis", "redis_url": f"redis://127.0.0.1:{port}/0",
                                 "key_prefix": f"helixtest:{uuid.uuid4().hex}:", "redis_timeout": "200ms"}})
    svc = gw.app.services["cache"]
    for _ in range(4):
        r = post(gw, body("redis is down"))
        assert r.status_code == 200 and r.headers["x-helixagent-cache"] == "BYPASS"
        ChatCompletion.model_validate(r.json())
    assert len(fake_openai.calls) == 4 and svc.errors >= 1

    def logged(word: str) -> int:
        return sum(word in rec.getMessage() for rec in caplog.records if rec.name == "helixagent.cache")

    assert logged("unreachable") == 1
    # Redis comes up (our own server on its own port): the cache is used again, and that is logged once
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        client = redis.Redis(port=port)

        def up() -> bool:
            try:
                return bool(client.ping())
            except redis.ConnectionError:
                return False

        assert wait_until(up, 10)
        assert wait_until(lambda: post(gw, body("redis is back")).headers["x-helixagent-cache"] == "HIT", 10, 0.2)
        assert logged("back in use") == 1
        assert client.exists(*[k for k in client.scan_iter(match="helixtest:*")])
    finally:
        proc.terminate()
        proc.wait(10)
    # down again: served, and a second outage is logged once more
    errors = svc.errors
    assert wait_until(lambda: post(gw, body("down again")).headers["x-helixagent-cache"] == "BYPASS", 10, 0.2)
    r = post(gw, body("down again"))
    assert r.status_code == 200 and svc.errors > errors
    assert logged("unreachable") == 2


def test_answer_from_a_fallback_is_shared_but_not_stored_under_the_primary(make_gateway: Any, fake_openai: Any) -> None:
    gw = make_gateway({"providers": [fake_openai.provider("openai", fallback_to=["backup"], max_retries=0),
                                     fake_openai.provider("backup", priority=2)],
                       "cache": {"enabled": True}})
    fake_openai.push(Fault(status=503))
    r = post(gw, body("primary down"))
    assert r.status_code == 200 and r.headers["x-helixagent-provider"] == "backup"
    assert r.headers["x-helixagent-cache"] == "MISS"
    r = post(gw, body("primary down"))  # the key is the primary's (openai, gpt-4o-mini): not stored
    assert r.headers["x-helixagent-provider"] == "openai" and r.headers["x-helixagent-cache"] == "MISS"
    r = post(gw, body("primary down"))
    assert r.headers["x-helixagent-provider"] == "openai" and r.headers["x-helixagent-cache"] == "HIT"
    assert len(fake_openai.calls) == 3


def test_anthropic_messages_share_the_cache_and_replay_as_anthropic_events(cached_gw: Any, fake_openai: Any) -> None:
    import anthropic
    from anthropic.types import Message
    gw = cached_gw()
    c = anthropic.Anthropic(base_url=gw.url, api_key="unused", max_retries=0, timeout=20)
    kw = dict(model="gpt-4o-mini", max_tokens=50, extra_body={"temperature": 0},
              messages=[{"role": "user", "content": "via anthropic"}])
    first = c.messages.with_raw_response.create(**kw)
    assert first.headers["x-helixagent-cache"] == "MISS"
    m1 = Message.model_validate(orjson.loads(first.http_response.content))
    second = c.messages.with_raw_response.create(**kw)
    assert second.headers["x-helixagent-cache"] == "HIT"
    m2 = Message.model_validate(orjson.loads(second.http_response.content))
    assert m2.content[0].text == m1.content[0].text == "echo:via echo:anthropic"
    assert m2.usage.output_tokens == m1.usage.output_tokens
    with c.messages.stream(**kw) as s:  # the cached answer as Anthropic SSE
        text = "".join(s.text_stream)
        final = s.get_final_message()
    assert text == "echo:via echo:anthropic" and final.stop_reason == "end_turn"
    Message.model_validate(final.model_dump())
    # the same question through the OpenAI API resolves to the same canonical request: shared entry
    r = post(gw, {"model": "gpt-4o-mini", "max_tokens": 50, "temperature": 0, "messages": msgs("via anthropic")})
    assert r.headers["x-helixagent-cache"] == "HIT"
    assert len(fake_openai.calls) == 1


def test_records_say_cache_hit(make_gateway: Any, fake_openai: Any, tmp_path: Any) -> None:
    from helixagent.store.db import make_sync_engine
    from helixagent.store.schema import completions as C
    import sqlalchemy as sa
    db = f"sqlite:///{tmp_path}/cache-records.db"
    gw = make_gateway({"providers": [fake_openai.provider()], "cache": {"enabled": True},
                       "database": {"url": db, "spool_dir": str(tmp_path / "spool"), "auto_migrate": True,
                                    "flush_interval": "50ms"}})
    ids = []
    for b in (body("record me"), body("record me"), body("record me", stream=True)):
        r = post(gw, b)
        assert r.status_code == 200
        ids.append((r.headers["x-helixagent-request-id"], r.headers["x-helixagent-cache"]))
    assert gw.run(gw.app.services["records"].writer.flush(20), timeout=30)
    eng = make_sync_engine(db)
    try:
        with eng.connect() as conn:
            got = {r["request_id"]: r for r in conn.execute(sa.select(C)).mappings()}
    finally:
        eng.dispose()
    assert [got[i]["cache_hit"] for i, _ in ids] == [False, True, True]
    assert [s for _, s in ids] == ["MISS", "HIT", "HIT"]
    assert len({got[i]["total_tokens"] for i, _ in ids}) == 1  # the original answer's usage, reported
    assert len(fake_openai.calls) == 1
