"""Server-sent events: parse an upstream byte stream into (event, data) pairs."""
from __future__ import annotations

from typing import AsyncIterator


async def sse_events(lines: AsyncIterator[bytes]) -> AsyncIterator[tuple[str | None, bytes]]:
    """Yield ``(event_name, data)`` per SSE event.  Multi-line data is joined with newlines;
    comments (``:``) and ``id``/``retry`` fields are ignored."""
    event: str | None = None
    data: list[bytes] = []
    async for raw in lines:
        line = raw.rstrip(b"\r\n")
        if not line:
            if data:
                yield event, b"\n".join(data)
            event, data = None, []
            continue
        if line[0:1] == b":":
            continue
        name, _, value = line.partition(b":")
        if value[:1] == b" ":
            value = value[1:]
        if name == b"data":
            data.append(value)
        elif name == b"event":
            event = value.decode("utf-8", "replace")
    if data:
        yield event, b"\n".join(data)
