"""Server-sent events: parse an upstream byte stream into (event, data) pairs."""
from __future__ import annotations

from typing import AsyncGenerator, AsyncIterator


async def sse_from_chunks(chunks: AsyncIterator[bytes]) -> AsyncGenerator[tuple[str | None, bytes], None]:
    """Yield ``(event_name, data)`` per SSE event, straight from raw body chunks.  Multi-line data is
    joined with newlines; comments and ``id``/``retry`` fields are ignored; LF and CRLF framing, and
    events split anywhere across chunks, are handled.  Closing it closes ``chunks`` too."""
    try:
        buf = b""
        async for chunk in chunks:
            buf = buf + chunk if buf else chunk
            if b"\r" in buf:
                if buf[-1:] == b"\r":  # a CR LF pair may be split across chunks: wait for the next byte
                    continue
                buf = buf.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
            if b"\n\n" not in buf:
                continue
            blocks = buf.split(b"\n\n")
            buf = blocks.pop()
            for block in blocks:
                ev = _parse_block(block)
                if ev is not None:
                    yield ev
        buf = buf.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        for block in buf.split(b"\n\n"):
            if not block.strip():
                continue
            ev = _parse_block(block)
            if ev is not None:
                yield ev
    finally:  # closed early (a [DONE] reached, an error): close the source now, not when it is collected
        aclose = getattr(chunks, "aclose", None)
        if aclose is not None:
            await aclose()


def _parse_block(block: bytes) -> tuple[str | None, bytes] | None:
    if block[:6] == b"data: " and b"\n" not in block:  # the common case: one data line
        return None, block[6:]
    event: str | None = None
    data: list[bytes] = []
    for line in block.split(b"\n"):
        if not line or line[:1] == b":":
            continue
        name, _, value = line.partition(b":")
        if value[:1] == b" ":
            value = value[1:]
        if name == b"data":
            data.append(value)
        elif name == b"event":
            event = value.decode("utf-8", "replace")
    if not data:
        return None
    return event, b"\n".join(data)
