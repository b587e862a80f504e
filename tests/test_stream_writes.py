"""A stream's chunks of one loop iteration leave in one write (api/protocol.py), and nothing else changes
on the wire: the head with the first chunk, the end at once, a whole answer's head with its body.

Drives the real server protocol (api/protocol.py: HelixHttpProtocol and its Cycle) with a transport that
records every write; then the real gateway over sockets: many concurrent streams, a client that leaves mid-stream."""
from __future__ import annotations

import asyncio
import socket
import threading
from typing import Any

import httpx
import orjson

from helixagent.api.server import HelixHttpProtocol, uvicorn_config
from helixagent.api.protocol import Cycle
from helixagent.config import load_config_dict
from support.servers import GatewayServer
from fakes.openai_upstream import Fault, FakeOpenAI


class RecordingTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:  # type: ignore[override]
        self.writes.append(bytes(data))

    def writelines(self, parts: Any) -> None:  # one call = one write on the wire (uvloop: one writev)
        self.writes.append(b"".join(bytes(p) for p in parts))

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 5555), "sockname": ("127.0.0.1", 80)}.get(name, default)

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def protocol(app: Any, t: RecordingTransport) -> HelixHttpProtocol:
    """The server's protocol on ``t``, created inside the running loop (it binds the current loop)."""
    cfg = uvicorn_config(app, load_config_dict({}).server, log_level="warning")
    cfg.load()
    state = type("S", (), {"connections": set(), "tasks": set(), "default_headers": [], "total_requests": 0})()
    proto = HelixHttpProtocol(cfg, state, {}, asyncio.get_running_loop())
    proto.connection_made(t)
    return proto


async def wait_for(cond: Any, rounds: int = 400) -> None:
    for _ in range(rounds):
        if cond():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("condition not reached")


POST = b"POST /x HTTP/1.1\r\nhost: a\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"


def test_chunks_of_one_iteration_are_one_write() -> None:
    release = asyncio.Event()
    seen: dict[str, Any] = {}
    t = RecordingTransport()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        await send({"type": "http.response.body", "body": b"data: 0\n\n", "more_body": True})
        seen["after_first"] = len(t.writes)  # head and first event are out before anything else runs
        for i in (1, 2, 3):  # three events of one upstream read: no await between them
            await send({"type": "http.response.body", "body": b"data: %d\n\n" % i, "more_body": True})
        seen["before_tick"] = len(t.writes)
        await release.wait()
        await send({"type": "http.response.body", "body": b"data: 4\n\n", "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        seen["at_end"] = len(t.writes)

    async def run() -> None:
        proto = protocol(app, t)
        proto.data_received(POST)
        await wait_for(lambda: "before_tick" in seen)
        await asyncio.sleep(0.01)
        assert len(t.writes) == 2  # head with the first event, the three gathered ones in one write
        release.set()
        await wait_for(lambda: "at_end" in seen)
        proto.connection_lost(None)

    asyncio.run(run())
    assert seen["after_first"] == 1 and seen["before_tick"] == 1
    assert t.writes[0].startswith(b"HTTP/1.1 200 OK") and b"transfer-encoding: chunked" in t.writes[0]
    assert t.writes[0].endswith(b"\r\n\r\n9\r\ndata: 0\n\n\r\n")  # the head and the first event in one write
    assert t.writes[1] == b"9\r\ndata: 1\n\n\r\n9\r\ndata: 2\n\n\r\n9\r\ndata: 3\n\n\r\n"
    # the end is written at once (with the chunk gathered before it), not a loop iteration later
    assert seen["at_end"] == 3 and t.writes[2] == b"9\r\ndata: 4\n\n\r\n0\r\n\r\n"


def test_a_stream_head_leaves_on_its_own_when_the_first_event_is_late() -> None:
    """The head waits for the first event only until the end of its loop iteration: a slow first event
    (an ensemble's panel, a slow model) does not keep the client from seeing the response head."""
    t = RecordingTransport()
    gate = asyncio.Event()
    seen: dict[str, Any] = {}

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        await gate.wait()
        await send({"type": "http.response.body", "body": b"data: 0\n\n", "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        seen["done"] = True

    async def run() -> None:
        proto = protocol(app, t)
        proto.data_received(POST)
        await wait_for(lambda: bool(t.writes))
        assert len(t.writes) == 1 and t.writes[0].startswith(b"HTTP/1.1 200 OK") and t.writes[0].endswith(b"\r\n\r\n")
        gate.set()
        await wait_for(lambda: "done" in seen)
        proto.connection_lost(None)

    asyncio.run(run())
    assert t.writes[1] == b"9\r\ndata: 0\n\n\r\n" and b"".join(t.writes).endswith(b"0\r\n\r\n")


def test_whole_answer_is_one_write_and_gets_the_real_transport_back() -> None:
    cycles: list[Any] = []
    t = RecordingTransport()
    holder: list[HelixHttpProtocol] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", b"11")]})
        cycles.append(holder[0].cycle)
        await send({"type": "http.response.body", "body": b'{"ok":true}'})

    async def run() -> None:
        proto = protocol(app, t)
        holder.append(proto)
        proto.data_received(POST)
        await wait_for(lambda: len(t.writes) >= 1)
        await asyncio.sleep(0.01)
        proto.connection_lost(None)

    asyncio.run(run())
    assert len(t.writes) == 1  # head and body in one write
    assert t.writes[0].startswith(b"HTTP/1.1 200 OK") and t.writes[0].endswith(b'\r\n\r\n{"ok":true}')
    assert cycles[0].transport is t  # nothing stands between the cycle and the socket


def test_a_whole_answer_head_waits_for_the_body_across_an_await() -> None:
    """The pipeline records between head and body (send_bytes' ``started``): the head waits, then both go
    in one write; a large body is written vectored (not copied into the head's buffer)."""
    t = RecordingTransport()
    gate = asyncio.Event()
    big = b"x" * (200 * 1024)
    seen: dict[str, int] = {}

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", str(len(big)).encode())]})
        seen["after_head"] = len(t.writes)
        await gate.wait()
        await send({"type": "http.response.body", "body": big})

    async def run() -> None:
        proto = protocol(app, t)
        proto.data_received(POST)
        await wait_for(lambda: "after_head" in seen)
        await asyncio.sleep(0.01)
        assert t.writes == []  # nothing on the wire while the request is being recorded
        gate.set()
        await wait_for(lambda: bool(t.writes))
        proto.connection_lost(None)

    asyncio.run(run())
    assert len(t.writes) == 1 and t.writes[0].startswith(b"HTTP/1.1 200 OK") and t.writes[0].endswith(big)


def test_head_request_and_a_failure_after_the_head() -> None:
    """A HEAD answer has no body write: its head leaves at once.  An application that fails after the head
    of a whole answer: the held head is written before the connection closes (as before, a short answer)."""
    async def head_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"5")]})
        await send({"type": "http.response.body", "body": b""})

    async def failing_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"5")]})
        raise RuntimeError("boom after the head")

    async def run(app: Any, request: bytes) -> RecordingTransport:
        t = RecordingTransport()
        proto = protocol(app, t)
        proto.data_received(request)
        await wait_for(lambda: bool(t.writes))
        await asyncio.sleep(0.01)
        proto.connection_lost(None)
        return t

    t = asyncio.run(run(head_app, b"HEAD /x HTTP/1.1\r\nhost: a\r\n\r\n"))
    assert len(t.writes) == 1 and t.writes[0].startswith(b"HTTP/1.1 200 OK") and t.writes[0].endswith(b"\r\n\r\n")
    t = asyncio.run(run(failing_app, POST))
    assert t.writes[0].startswith(b"HTTP/1.1 200 OK") and t.closed


def test_100_continue_then_a_stream() -> None:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"data: a\n\n", "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    t = RecordingTransport()

    async def run() -> None:
        proto = protocol(app, t)
        proto.data_received(b"POST /x HTTP/1.1\r\nhost: a\r\ncontent-length: 2\r\nexpect: 100-continue\r\n\r\n")
        await wait_for(lambda: bool(t.writes))
        assert t.writes == [b"HTTP/1.1 100 Continue\r\n\r\n"]
        proto.data_received(b"{}")
        await wait_for(lambda: any(w.endswith(b"0\r\n\r\n") for w in t.writes))
        proto.connection_lost(None)

    asyncio.run(run())
    assert t.writes[1].startswith(b"HTTP/1.1 200 OK")
    assert b"".join(t.writes[1:]).endswith(b"\r\n\r\n9\r\ndata: a\n\n\r\n0\r\n\r\n")


def test_close_flushes_what_was_gathered() -> None:
    """An application that fails mid-stream: what was gathered is written before the connection closes."""
    t = RecordingTransport()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for part in (b"first", b"second", b"third"):
            await send({"type": "http.response.body", "body": part, "more_body": True})
        raise RuntimeError("the application fails mid-stream")

    async def run() -> None:
        proto = protocol(app, t)
        proto.data_received(POST)
        cycles.append(proto.cycle)
        await wait_for(lambda: t.closed)
        await asyncio.sleep(0.01)  # the scheduled flushes find nothing left
        proto.connection_lost(None)

    cycles: list[Any] = []
    asyncio.run(run())
    assert len(t.writes) == 2 and t.writes[0].endswith(b"\r\n\r\n5\r\nfirst\r\n")
    assert t.writes[1] == b"6\r\nsecond\r\n5\r\nthird\r\n" and t.closed
    assert isinstance(cycles[0], Cycle) and not hasattr(cycles[0], "__dict__")  # no per-request dict


def _sse_events(body: bytes) -> list[bytes]:
    return [e[6:] for e in body.split(b"\n\n") if e.startswith(b"data: ")]


def test_concurrent_streams_arrive_whole_and_in_order(make_gateway: Any, fake_openai: FakeOpenAI) -> None:
    fake_openai.words = 40
    gw: GatewayServer = make_gateway({"providers": [fake_openai.provider()]})
    words = " ".join(f"w{i}" for i in range(40))

    async def one(c: httpx.AsyncClient, n: int) -> None:
        body = {"model": "gpt-4o-mini", "stream": True, "messages": [{"role": "user", "content": f"{n} {words}"}]}
        r = await c.post(gw.url + "/v1/chat/completions", json=body)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = _sse_events(r.content)
        assert events[-1] == b"[DONE]"
        text = "".join((orjson.loads(e)["choices"] or [{}])[0].get("delta", {}).get("content") or ""
                       for e in events[:-1])
        assert text.split() == [f"echo:{w}" for w in f"{n} {words}".split()][:40]

    async def run() -> None:
        async with httpx.AsyncClient(timeout=30) as c:
            await asyncio.gather(*(one(c, n) for n in range(24)))
    asyncio.run(run())


def test_a_client_that_leaves_mid_stream(make_gateway: Any, fake_openai: FakeOpenAI) -> None:
    fake_openai.push(Fault(chunk_delay=0.05))
    gw: GatewayServer = make_gateway({"providers": [fake_openai.provider()]})
    body = orjson.dumps({"model": "gpt-4o-mini", "stream": True, "messages": [{"role": "user", "content": "a b c d e"}]})
    s = socket.create_connection(("127.0.0.1", gw.port), timeout=10)
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: a\r\ncontent-type: application/json\r\n"
              b"content-length: %d\r\n\r\n" % len(body) + body)
    got = b""
    while b"data: " not in got:
        got += s.recv(65536)
    s.close()  # gone after the first event
    done = threading.Event()

    def later() -> None:
        r = httpx.post(gw.url + "/v1/chat/completions", json={"model": "gpt-4o-mini", "stream": True,
                                                                "messages": [{"role": "user", "content": "x"}]},
                       timeout=30)
        assert r.status_code == 200 and _sse_events(r.content)[-1] == b"[DONE]"
        done.set()
    th = threading.Thread(target=later)
    th.start()
    th.join(30)
    assert done.is_set()
