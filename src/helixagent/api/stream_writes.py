"""Streamed answers: the chunks written in one event-loop iteration leave in one write.

uvicorn's cycle writes every chunk of a chunked (streamed) response with its own ``transport.write``: one
``send(2)`` per SSE event.  When several events arrive in one upstream read (a loaded gateway, a fast
model), the gateway used to make one system call per event where a byte relay makes one per read.
:class:`StreamWrites` stands in for the transport of one request's cycle: once the response head says
chunked, writes are gathered and flushed at the end of the current loop iteration (``call_soon``), so the
events of one read -- and of every read completed in that iteration -- go out in one vectored write.  The
head, the first chunk (time to first byte) and the terminal chunk are written at once; a response with a
known length gets the real transport back after its head.  Only later chunks of a stream wait, for one
loop iteration at most.
"""
from __future__ import annotations

import asyncio
from typing import Any

_LAST_CHUNK = b"0\r\n\r\n"


class StreamWrites:
    __slots__ = ("_t", "_cycle", "_loop", "_buf", "_mode")

    def __init__(self, transport: asyncio.Transport, cycle: Any, loop: asyncio.AbstractEventLoop) -> None:
        self._t = transport
        self._cycle = cycle
        self._loop = loop
        self._buf: list[bytes] = []
        self._mode = 0  # 0: head not written yet; 1: chunked, no chunk yet; 2: chunks are gathered

    def write(self, data: bytes) -> None:
        mode = self._mode
        if mode == 1:  # a stream's first body chunk: at once
            self._mode = 2
            self._t.write(data)
            if data.endswith(_LAST_CHUNK):
                self._cycle.transport = self._t
            return
        if mode == 2:  # a later chunk: gathered until the end of this loop iteration
            buf = self._buf
            buf.append(data)
            if data.endswith(_LAST_CHUNK):  # the end of the stream: out now, before anything that follows
                self.flush()
                self._cycle.transport = self._t
            elif len(buf) == 1:
                self._loop.call_soon(self.flush)
            return
        c = self._cycle
        if c.response_started:  # this write is the head (a 100 Continue comes before it)
            if c.chunked_encoding:
                self._mode = 1  # the first chunk goes out at once (time to first byte), later ones gathered
            else:
                c.transport = self._t  # a whole answer: nothing to gather, the cycle writes directly again
        self._t.write(data)

    def flush(self) -> None:
        buf = self._buf
        if buf:
            self._buf = []
            if not self._t.is_closing():
                self._t.writelines(buf)

    def close(self) -> None:
        self.flush()
        self._t.close()

    def is_closing(self) -> bool:
        return self._t.is_closing()

    def __getattr__(self, name: str) -> Any:  # anything else the cycle may use: the real transport's
        return getattr(self._t, name)
