"""In-flight de-duplication across instances: three `helixagent serve` processes sharing the CI Redis
(a unique key prefix), a slow fake OpenAI upstream counting its calls.  Identical concurrent requests
spread over the three reach the upstream once (non-streamed and streamed: every client gets every chunk,
in order, and [DONE]); a leader SIGKILLed before it answered is replaced by one follower, and every other
request still gets the answer within its timeout."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest
import yaml

from conftest import need_redis
from fakes.openai_upstream import Fault, FakeOpenAI
from support.servers import free_port, wait_until

pytestmark = pytest.mark.redis
SRC = str(Path(__file__).resolve().parents[1] / "src")
URL = "/v1/chat/completions"


class Instance:
    def __init__(self, tmp: Path, i: int, cfg: dict[str, Any]):
        self.port = free_port()
        d = tmp / f"gw{i}"
        d.mkdir()
        cfg = dict(cfg, server={"port": self.port},
                   database={"url": f"sqlite:///{d}/h.db", "spool_dir": str(d / "spool")})
        (d / "helix.yaml").write_text(yaml.safe_dump(cfg))
        env = dict(os.environ, PYTHONPATH=SRC)
        for k in ("HELIXAGENT_API_KEY", "PROMETHEUS_MULTIPROC_DIR", "HTTPS_ENABLED", "TLS_CERT_PATH", "TLS_KEY_PATH"):
            env.pop(k, None)
        self.log = d / "serve.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "helixagent", "serve", "--config",
                                          str(d / "helix.yaml")], env=env, stdout=log, stderr=subprocess.STDOUT)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def up(self) -> bool:
        assert self.proc.poll() is None, self.log.read_text()
        try:
            return httpx.get(self.url + "/livez", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeOpenAI]:
    fake = FakeOpenAI()
    yield fake
    fake.close()


@pytest.fixture
def three(tmp_path: Path, upstream: FakeOpenAI) -> Iterator[list[Instance]]:
    url = need_redis()
    prefix = f"hxtest-fl-{uuid.uuid4().hex[:10]}:"
    upstream.reset()
    cfg = {"providers": [upstream.provider(max_retries=0)], "logging": {"level": "warning"},
           "routing": {"request_timeout_ms": 20000},
           "cache": {"enabled": True, "type": "redis", "redis_url": url, "key_prefix": prefix,
                     "redis_timeout": "3s", "flight_lease": "1s"}}
    gws = [Instance(tmp_path, i, cfg) for i in range(3)]
    try:
        assert wait_until(lambda: all(g.up() for g in gws), timeout=60, interval=0.2), \
            [g.log.read_text() for g in gws]
        yield gws
    finally:
        for g in gws:
            g.kill()
        import redis
        r = redis.Redis.from_url(url)
        keys = list(r.scan_iter(match=prefix + "*", count=1000))
        if keys:
            r.delete(*keys)
        r.close()
        upstream.reset()


def body(text: str, **kw: Any) -> dict[str, Any]:
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}], "temperature": 0, **kw}


async def _post(c: httpx.AsyncClient, base: str, data: dict[str, Any]) -> httpx.Response:
    return await c.post(base + URL, json=data)


def test_30_identical_requests_over_three_instances_make_one_upstream_call(three: list[Instance],
                                                                           upstream: FakeOpenAI) -> None:
    upstream.sticky = Fault(delay=2.0)   # slow enough that all 30 arrive while the first is in flight

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=30) as c:
            return await asyncio.gather(*(_post(c, three[i % 3].url, body("one call for all")) for i in range(30)))
    rs = asyncio.run(run())
    assert [r.status_code for r in rs] == [200] * 30, [r.text for r in rs if r.status_code != 200]
    assert len(upstream.calls) == 1
    answers = {r.json()["choices"][0]["message"]["content"] for r in rs}
    ids = {r.json()["id"] for r in rs}
    assert answers == {"echo:one echo:call echo:for echo:all"} and len(ids) == 1
    statuses = sorted(r.headers["x-helixagent-cache"] for r in rs)
    assert statuses == ["HIT"] * 29 + ["MISS"]
    # stored once: a later request on any instance is a hit
    r = httpx.post(three[2].url + URL, json=body("one call for all"), timeout=10)
    assert r.headers["x-helixagent-cache"] == "HIT" and len(upstream.calls) == 1


def _sse(lines: list[str]) -> list[str]:
    return [ln for ln in lines if ln.startswith("data: ")]


def test_30_identical_streams_over_three_instances_make_one_upstream_call(three: list[Instance],
                                                                          upstream: FakeOpenAI) -> None:
    upstream.sticky = Fault(chunk_delay=0.3)   # ~2 s of stream; followers join at every point of it

    async def one(c: httpx.AsyncClient, base: str, delay: float) -> list[str]:
        await asyncio.sleep(delay)
        async with c.stream("POST", base + URL, json=body("stream it to all of them", stream=True)) as r:
            assert r.status_code == 200
            return _sse([ln async for ln in r.aiter_lines()])

    async def run() -> list[list[str]]:
        async with httpx.AsyncClient(timeout=30) as c:
            return await asyncio.gather(*(one(c, three[i % 3].url, 0.03 * i) for i in range(30)))
    streams = asyncio.run(run())
    assert len(upstream.calls) == 1
    first = streams[0]
    assert first[-1] == "data: [DONE]" and len(first) >= 8
    for s in streams:
        assert s == first   # every chunk, in order, identical (ids included), then [DONE]
    text = "".join(__import__("json").loads(ln[6:])["choices"][0]["delta"].get("content") or ""
                   for ln in first[:-1] if __import__("json").loads(ln[6:])["choices"])
    assert text == "echo:stream echo:it echo:to echo:all echo:of"


def _streamed_answer(text: str) -> tuple[Any, ...]:
    """A chat.completion.chunk stream's answer: its id, content and finish reasons."""
    chunks = [json.loads(ln[6:]) for ln in text.splitlines() if ln.startswith("data: {")]
    content = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    finish = tuple(c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"])
    return (tuple(sorted({c["id"] for c in chunks})), content, finish)


@pytest.mark.parametrize("stream", [False, True])
def test_leader_sigkilled_before_answering_is_replaced_by_one_follower(three: list[Instance], upstream: FakeOpenAI,
                                                                        stream: bool) -> None:
    upstream.push(Fault(delay=60))       # the first call (the leader's) never answers before the kill
    upstream.sticky = Fault(delay=1.0)   # the replacement's call
    data = body(f"leader dies {stream}", stream=stream)

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=30) as c:
            lead = asyncio.ensure_future(_post(c, three[0].url, data))
            assert await asyncio.to_thread(wait_until, lambda: len(upstream.calls) == 1, 20)
            followers = [asyncio.ensure_future(_post(c, three[1 + i % 2].url, data)) for i in range(20)]
            await asyncio.sleep(0.5)
            t0 = time.monotonic()
            three[0].kill()
            rs = await asyncio.gather(*followers)
            assert time.monotonic() - t0 < 15   # lease 1 s + the replacement's 1 s call, bounded by the timeout
            lead.cancel()
            return rs
    rs = asyncio.run(run())
    assert [r.status_code for r in rs] == [200] * 20, [r.text[:300] for r in rs]
    new_calls = len(upstream.calls) - 1
    assert 1 <= new_calls <= 2, new_calls   # at most one per surviving instance (here: one takes over)
    if stream:
        assert all(r.text.rstrip().endswith("data: [DONE]") for r in rs)
        if new_calls == 1:
            # every follower got the takeover's answer: relayed live, or (one that came back after it was
            # stored) replayed from the cache -- the same answer, chunked differently
            assert len({_streamed_answer(r.text) for r in rs}) == 1, {_streamed_answer(r.text) for r in rs}
    else:
        assert {r.json()["choices"][0]["message"]["content"] for r in rs} == {"echo:leader echo:dies echo:" + str(stream)}


def test_leader_sigkilled_mid_stream_ends_the_followers_streams_with_an_error(three: list[Instance],
                                                                              upstream: FakeOpenAI) -> None:
    """Chunks already relayed cannot be continued by another upstream call: the streamed followers' streams
    end with an error event (no [DONE]) within about one lease -- never a hang; non-streamed followers,
    who have received nothing yet, start over and get the answer from one takeover."""
    upstream.sticky = Fault(chunk_delay=0.5)
    data = body("cut me off in the middle please", stream=True)

    async def read(c: httpx.AsyncClient, base: str, got: list[str]) -> None:
        async with c.stream("POST", base + URL, json=data) as r:
            assert r.status_code == 200
            async for ln in r.aiter_lines():
                if ln.startswith("data: "):
                    got.append(ln)

    async def run() -> tuple[list[list[str]], float]:
        async with httpx.AsyncClient(timeout=30) as c:
            lead_lines: list[str] = []
            lead = asyncio.ensure_future(read(c, three[0].url, lead_lines))
            while len(lead_lines) < 1:
                await asyncio.sleep(0.02)
            outs: list[list[str]] = [[] for _ in range(4)]
            fs = [asyncio.ensure_future(read(c, three[1 + i % 2].url, outs[i])) for i in range(4)]
            while min(len(o) for o in outs) < 2:
                await asyncio.sleep(0.02)
            # non-streamed followers (they have received nothing yet): they may start over
            plain = [asyncio.ensure_future(c.post(three[1 + i % 2].url + URL, json=dict(data, stream=False)))
                     for i in range(2)]
            await asyncio.sleep(0.3)
            t0 = time.monotonic()
            three[0].kill()
            await asyncio.wait_for(asyncio.gather(*fs, return_exceptions=True), 15)
            rs = await asyncio.wait_for(asyncio.gather(*plain), 15)
            lead.cancel()
            return outs, rs, time.monotonic() - t0
    outs, rs, took = asyncio.run(run())
    assert took < 8
    for o in outs:   # the streams already under way end with an error event, not a splice
        assert o[-1] != "data: [DONE]" and "error" in o[-1], o[-3:]
    assert [r.status_code for r in rs] == [200, 200]
    assert {r.json()["choices"][0]["message"]["content"] for r in rs} == {
        "echo:cut echo:me echo:off echo:in echo:the"}
    assert len(upstream.calls) == 2   # one takeover, for the non-streamed followers only
