"""The server's own HTTP/1.1 protocol (api/protocol.py) on the cases its cycle handles itself: pipelined
requests answered in order, HTTP/1.0 closing, chunked request bodies delivered in pieces, a slow reader's
back-pressure (send() waits for the transport to drain), receive() seeing http.disconnect, a bad response
header refused, an application that never answers getting a 500, and a real socket with pipelining."""
from __future__ import annotations

import asyncio
import socket
import threading
from typing import Any

import uvicorn

from helixagent.api.server import uvicorn_config
from helixagent.config import load_config_dict
from test_stream_writes import POST, RecordingTransport, protocol, wait_for


async def echo(scope: dict[str, Any], receive: Any, send: Any) -> None:
    body = b""
    while True:
        msg = await receive()
        body += msg.get("body", b"")
        if not msg.get("more_body"):
            break
    out = b"%s %s %d:%s" % (scope["method"].encode(), scope["path"].encode(), len(body), body)
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", str(len(out)).encode())]})
    await send({"type": "http.response.body", "body": out})


def run_protocol(app: Any, *chunks: bytes, until: Any = None) -> RecordingTransport:
    t = RecordingTransport()

    async def run() -> None:
        proto = protocol(app, t)
        for c in chunks:
            proto.data_received(c)
            await asyncio.sleep(0)
        await wait_for((lambda: until(t)) if until is not None else (lambda: bool(t.writes)))
        await asyncio.sleep(0.01)
        proto.connection_lost(None)

    asyncio.run(run())
    return t


def test_pipelined_requests_are_answered_in_order() -> None:
    reqs = b"".join(b"POST /p%d HTTP/1.1\r\nhost: a\r\ncontent-length: 1\r\n\r\n%d" % (i, i) for i in range(3))
    t = run_protocol(echo, reqs, until=lambda t: b"".join(t.writes).count(b"HTTP/1.1 200 OK") == 3)
    wire = b"".join(t.writes)
    assert wire.count(b"HTTP/1.1 200 OK") == 3
    assert wire.index(b"POST /p0 1:0") < wire.index(b"POST /p1 1:1") < wire.index(b"POST /p2 1:2")


def test_http_10_is_answered_and_closed() -> None:
    t = run_protocol(echo, b"POST /old HTTP/1.0\r\ncontent-length: 2\r\n\r\nhi", until=lambda t: t.closed)
    assert t.writes[0].startswith(b"HTTP/1.1 200 OK") and b"connection: close\r\n" in t.writes[0]
    assert t.writes[0].endswith(b"POST /old 2:hi") and t.closed


def test_a_chunked_request_body_arrives_in_pieces() -> None:
    head = b"POST /c HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n"
    t = run_protocol(echo, head, b"3\r\nabc\r\n", b"2\r\nde\r\n", b"0\r\n\r\n")
    assert t.writes[0].endswith(b"POST /c 5:abcde")


def test_send_waits_while_the_transport_is_paused() -> None:
    t = RecordingTransport()
    progress: list[str] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"one", "more_body": True})
        progress.append("one")
        await send({"type": "http.response.body", "body": b"two", "more_body": True})
        progress.append("two")
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        progress.append("end")

    async def run() -> None:
        proto = protocol(app, t)
        proto.pause_writing()  # the client does not read: the transport's buffer is above its high-water mark
        proto.data_received(POST)
        await asyncio.sleep(0.05)
        assert progress == [] and t.writes == []  # the head is not even sent while writing is paused
        proto.resume_writing()
        await wait_for(lambda: "end" in progress)
        proto.connection_lost(None)

    asyncio.run(run())
    assert b"".join(t.writes).endswith(b"3\r\none\r\n3\r\ntwo\r\n0\r\n\r\n")


def test_receive_sees_the_disconnect_and_send_is_then_silent() -> None:
    t = RecordingTransport()
    seen: list[Any] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen.append(await receive())
        seen.append(await receive())  # waits: the body is read, only a disconnect can come
        await send({"type": "http.response.start", "status": 200, "headers": []})  # after it: ignored

    async def run() -> None:
        proto = protocol(app, t)
        proto.data_received(POST)
        await wait_for(lambda: len(seen) == 1)
        await asyncio.sleep(0.02)
        assert len(seen) == 1
        proto.connection_lost(None)
        await wait_for(lambda: len(seen) == 2)
        await asyncio.sleep(0.01)

    asyncio.run(run())
    assert seen[0] == {"type": "http.request", "body": b"{}", "more_body": False}
    assert seen[1] == {"type": "http.disconnect"} and t.writes == []


def test_a_bad_response_header_is_refused_and_an_unanswered_request_gets_a_500() -> None:
    errors: list[str] = []

    async def bad_header(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()
        try:
            await send({"type": "http.response.start", "status": 200, "headers": [(b"x-a", b"one\r\nx-b: two")]})
        except RuntimeError as exc:
            errors.append(str(exc))

    t = run_protocol(bad_header, POST, until=lambda t: t.closed)
    assert errors == ["Invalid HTTP header value."]
    assert b"x-b: two" not in b"".join(t.writes)  # nothing of the refused head reached the wire
    assert t.writes[0].startswith(b"HTTP/1.1 500 Internal Server Error") and t.closed

    async def silent(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()

    t = run_protocol(silent, POST, until=lambda t: t.closed)
    assert t.writes[0].startswith(b"HTTP/1.1 500 Internal Server Error") and t.closed


def test_over_a_real_socket_pipelined_and_keep_alive() -> None:
    """uvicorn's Server running the protocol: several requests in one send, then more on the same connection."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = uvicorn_config(echo, load_config_dict({}).server, host="127.0.0.1", port=port, log_level="warning",
                         lifespan="off", loop="uvloop")
    server = uvicorn.Server(cfg)
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    try:
        for _ in range(200):
            if server.started:
                break
            threading.Event().wait(0.02)
        with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
            c.sendall(b"".join(b"POST /%d HTTP/1.1\r\nhost: a\r\ncontent-length: 1\r\n\r\nx" % i for i in range(5)))
            got = b""
            while got.count(b"HTTP/1.1 200 OK") < 5 or not got.endswith(b"1:x"):
                got += c.recv(65536)
            assert [got.index(b"POST /%d 1:x" % i) for i in range(5)] == sorted(got.index(b"POST /%d 1:x" % i)
                                                                                for i in range(5))
            c.sendall(b"POST /again HTTP/1.1\r\nhost: a\r\ncontent-length: 0\r\n\r\n")
            got = b""
            while not got.endswith(b"POST /again 0:"):
                got += c.recv(65536)
    finally:
        server.should_exit = True
        th.join(10)


def test_a_head_block_is_written_as_given_and_a_malformed_one_is_refused() -> None:
    """The helixagent.head_block extension: advertised in the scope; well-formed lines are written after
    the framing headers; a block that is not whole header lines (a bare LF, a control character, no
    ": ") is refused like a bad header, before the response starts (the application may still answer)."""
    outcomes: list[Any] = []

    def app_with(block: bytes) -> Any:
        async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
            assert "helixagent.head_block" in scope["extensions"]
            await receive()
            try:
                await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")],
                            "helixagent.head_block": block})
            except RuntimeError as exc:
                outcomes.append(str(exc))
                return
            await send({"type": "http.response.body", "body": b"ok"})
        return app

    t = run_protocol(app_with(b"x-a: 1\r\nx-b: two words\r\n"), POST)
    assert t.writes[0] == b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nx-a: 1\r\nx-b: two words\r\n\r\nok"
    for bad in (b"x-a: 1\nx-b: 2\r\n", b"x-a: 1\r\nx-b: \x00\r\n", b"x-a 1\r\n", b"x-a: 1"):
        outcomes.clear()
        t = run_protocol(app_with(bad), POST, until=lambda t: t.closed)
        assert outcomes == ["Invalid HTTP header block."]
        assert t.writes[0].startswith(b"HTTP/1.1 500 Internal Server Error") and b"x-a" not in b"".join(t.writes)


def helix_server(monkeypatch: Any) -> tuple[Any, Any, int]:
    """A HelixServer running :func:`echo` on a free loopback port (uvloop), not started yet; its shutdown
    sets the process-wide close-after-every-answer flag, restored after the test."""
    from helixagent.api import cycle
    from helixagent.api.server import HelixServer

    monkeypatch.setattr(cycle, "_closing", False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = uvicorn_config(echo, load_config_dict({}).server, host="127.0.0.1", port=port, log_level="warning",
                         lifespan="off", loop="uvloop")
    return cfg, HelixServer(cfg), port


def test_shutdown_answers_connections_waiting_in_the_backlog_and_closes_idle_ones(monkeypatch: Any) -> None:
    """Closing a listening socket resets the connections the kernel accepted into its backlog and the server
    had not yet (a request a proxy wrote on one is lost: for a POST, a 502).  Here the loop is held while
    clients connect and write their requests, then the server shuts down: every one of them is answered,
    with ``connection: close``, and then closed; so is a keep-alive connection whose next request arrived
    while the loop was held; an idle keep-alive connection is closed, one that never sent anything after a
    short grace; the port refuses."""
    import time

    import uvloop

    cfg, server, port = helix_server(monkeypatch)
    up, written = threading.Event(), threading.Event()
    answers: dict[int, bytes] = {}

    async def scenario() -> None:
        cfg.load()
        server.lifespan = cfg.lifespan_class(cfg)
        await server.startup()
        up.set()
        await asyncio.sleep(0.3)           # the idle keep-alive connection is made and answered
        assert written.wait(10)           # the loop is held: the clients wait in the backlog
        # the drain reaches the open connections before the loop has read what arrived meanwhile (the
        # pooled connection's second request); then it closes the listener and accepts the backlog
        for conn in list(server.server_state.connections):
            conn.shutdown()
        await server.shutdown()

    def client(i: int) -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
            c.sendall(b"POST /b%d HTTP/1.1\r\nhost: a\r\ncontent-length: 1\r\n\r\nx" % i)
            done.append(i)
            if len(done) == 8:
                written.set()
            got = b""
            try:
                while chunk := c.recv(65536):
                    got += chunk
            except OSError as exc:
                got += repr(exc).encode()
            answers[i] = got

    done: list[int] = []
    th = threading.Thread(target=lambda: uvloop.run(scenario()), daemon=True)
    th.start()
    assert up.wait(10)
    idle = socket.create_connection(("127.0.0.1", port), timeout=10)
    idle.sendall(b"POST /idle HTTP/1.1\r\nhost: a\r\ncontent-length: 1\r\n\r\nx")
    assert idle.recv(65536).endswith(b"POST /idle 1:x")
    pooled = socket.create_connection(("127.0.0.1", port), timeout=10)   # a proxy's pooled connection
    pooled.sendall(b"POST /p1 HTTP/1.1\r\nhost: a\r\ncontent-length: 1\r\n\r\nx")
    assert pooled.recv(65536).endswith(b"POST /p1 1:x")
    silent = socket.create_connection(("127.0.0.1", port), timeout=10)   # accepted, sends nothing
    time.sleep(0.4)                        # the loop is now held (scenario waits for `written`)
    # the proxy reuses its pooled connection just before the drain: the request sits unread in the kernel
    pooled.sendall(b"POST /p2 HTTP/1.1\r\nhost: a\r\ncontent-length: 1\r\n\r\nx")
    clients = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in clients:
        t.start()
    for t in clients:
        t.join(15)
    th.join(15)
    for i in range(8):
        got = answers[i]
        assert got.startswith(b"HTTP/1.1 200 OK") and got.endswith(b"POST /b%d 1:x" % i), got
        assert b"\r\nconnection: close\r\n" in got.lower(), got
    assert idle.recv(65536) == b""         # closed by the shutdown
    idle.close()
    got = b""
    try:                                   # answered (closing it with the bytes unread would reset it)
        while chunk := pooled.recv(65536):
            got += chunk
    except OSError as exc:
        got += repr(exc).encode()
    pooled.close()
    assert got.startswith(b"HTTP/1.1 200 OK") and got.endswith(b"POST /p2 1:x"), got
    assert b"\r\nconnection: close\r\n" in got.lower(), got
    t0 = time.monotonic()
    assert silent.recv(65536) == b""       # left a short grace for a first request, then closed
    assert time.monotonic() - t0 < 2
    silent.close()
    assert not th.is_alive()
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
        raise AssertionError("the port still accepts after the shutdown")
    except ConnectionRefusedError:
        pass


def test_shutdown_completes_no_new_connection_between_its_backlog_sweep_and_the_close(monkeypatch: Any) -> None:
    """The drain accepts the backlog and closes the listener in one step, but the kernel completes
    handshakes on its own: a connection completed between the sweep and the close was reset, after its
    client had written a request on it (nginx opening a connection per request after SIGTERM: a POST lost,
    a 502; the SIGTERM test's last flake).  Here a client connects at exactly that moment, and writes: its
    connect must not complete (the SYN is dropped) -- it is refused once the port is closed, which a proxy
    retries elsewhere -- while a connection completed before is still answered."""
    import time

    import uvloop

    from helixagent.api import server as server_mod

    cfg, server, port = helix_server(monkeypatch)
    late: dict[str, Any] = {}
    sweep = server_mod._accept_backlog

    def sweep_then_connect(servers: list[Any]) -> list[socket.socket]:
        accepted = sweep(servers)
        t0 = time.monotonic()
        try:                           # on the loop's thread: nothing else runs before the close
            c = socket.create_connection(("127.0.0.1", port), timeout=0.3)
        except OSError as exc:
            late["connect"] = type(exc).__name__
        else:
            c.sendall(b"POST /late HTTP/1.1\r\nhost: a\r\ncontent-length: 1\r\n\r\nx")
            late["connect"], late["sock"] = "completed", c
        late["took"] = time.monotonic() - t0
        return accepted

    monkeypatch.setattr(server_mod, "_accept_backlog", sweep_then_connect)
    early: list[bytes] = []

    async def scenario() -> None:
        cfg.load()
        server.lifespan = cfg.lifespan_class(cfg)
        await server.startup()
        c = await asyncio.to_thread(socket.create_connection, ("127.0.0.1", port), 10)
        await server.shutdown()                 # the connection is idle: closed
        early.append(await asyncio.to_thread(c.recv, 100))
        c.close()

    uvloop.run(scenario())
    assert early == [b""]
    sock = late.get("sock")
    if sock is not None:                        # what happened before: the request written, then a reset
        try:
            got = sock.recv(65536)
        except OSError as exc:
            got = repr(exc).encode()
        sock.close()
        raise AssertionError(f"a connection completed after the backlog sweep; its request got {got!r}")
    assert late["connect"] == "TimeoutError", late
    t0 = time.monotonic()
    try:                                        # the client's SYN retransmission finds the port closed
        socket.create_connection(("127.0.0.1", port), timeout=3).close()
        raise AssertionError("the port still accepts after the shutdown")
    except ConnectionRefusedError:
        pass
    assert time.monotonic() - t0 < 1
