"""One write per whole response: the response head of a ``content-length`` answer is held until its body.

uvicorn's cycle writes the head at ``http.response.start`` and the body at ``http.response.body``: two
``write()`` calls, two TCP segments, two wake-ups of the client.  HelixAgent runs its post-hooks (record,
limits settle, metrics) between the two (api/http.py ``send_bytes(started=...)``), so the head also
sat alone on the wire while they ran.  :class:`HeadCork` stands in for the transport of one request's
cycle: the head of a response with a body of known length is kept and goes out with the first body
bytes in one vectored write.  A streamed (chunked) response's head is written at once (time to first
byte unchanged); so are interim ``100 Continue`` lines, written before the head.  The head is still
built and checked by uvicorn at ``http.response.start`` (an invalid header still fails there).
"""
from __future__ import annotations

import asyncio
from typing import Any


class HeadCork:
    __slots__ = ("_t", "_cycle", "_held", "_head_seen")

    def __init__(self, transport: asyncio.Transport, cycle: Any) -> None:
        self._t = transport
        self._cycle = cycle
        self._held: bytes | None = None
        self._head_seen = False

    def write(self, data: bytes) -> None:
        held = self._held
        if held is not None:
            self._held = None
            self._t.writelines((held, data))
            return
        if not self._head_seen:
            c = self._cycle
            if c.response_started:  # this write is the head (a 100 Continue comes before it)
                self._head_seen = True
                if c.chunked_encoding is False and c.expected_content_length > 0 and c.scope["method"] != "HEAD":
                    self._held = data
                    return
        self._t.write(data)

    def close(self) -> None:
        held = self._held
        if held is not None:  # not expected (a held head always has a body); never lose it silently
            self._held = None
            self._t.write(held)
        self._t.close()

    def is_closing(self) -> bool:
        return self._t.is_closing()

    def __getattr__(self, name: str) -> Any:  # anything else the cycle may use: the real transport's
        return getattr(self._t, name)
