import asyncio

import pytest

from helixagent.providers.sse import sse_from_chunks


async def agen(items):
    for i in items:
        yield i


def collect(gen):
    async def go():
        return [x async for x in gen]
    return asyncio.run(go())


STREAM = (b"event: message_start\r\ndata: {\"a\":1}\r\n\r\n: comment\n\ndata: line1\ndata: line2\n\n"
          b"data: {\"b\":2}\n\nid: 7\nretry: 10\nevent: ping\ndata: {}\n\ndata: [DONE]\n\n")
EXPECTED = [("message_start", b'{"a":1}'), (None, b"line1\nline2"), (None, b'{"b":2}'), ("ping", b"{}"),
            (None, b"[DONE]")]


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 16, 1000])
def test_chunk_boundaries_anywhere(size):
    chunks = [STREAM[i:i + size] for i in range(0, len(STREAM), size)]
    assert collect(sse_from_chunks(agen(chunks))) == EXPECTED


def test_trailing_event_without_blank_line():
    assert collect(sse_from_chunks(agen([b"data: x\n\ndata: y"]))) == [(None, b"x"), (None, b"y")]
