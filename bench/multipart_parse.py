"""Multipart parsers for POST /v1/files, measured on this machine: the time to parse a form with a
``purpose`` field and a JSONL file part (1 MiB and 20 MiB), fed in 64 KiB chunks as the ASGI server
hands them over.  Candidates: python-multipart's push parser (streaming: bounded as it goes), the
standard library's email parser (needs the whole body first), and a hand-written split on the boundary
(the floor: no header parsing worth the name).  Run: python bench/multipart_parse.py"""
from __future__ import annotations

import email.parser
import email.policy
import statistics
import time

from python_multipart import MultipartParser

BOUNDARY = b"----helixbench7MA4YWxkTrZu0gW"
CHUNK = 64 * 1024


def form(size: int) -> bytes:
    line = b'{"custom_id":"r-000000","method":"POST","url":"/v1/chat/completions","body":{"model":"m","messages":[{"role":"user","content":"hello there"}]}}\n'
    data = line * (size // len(line))
    return (b"--" + BOUNDARY + b'\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n--' + BOUNDARY
            + b'\r\nContent-Disposition: form-data; name="file"; filename="in.jsonl"\r\n'
            b"Content-Type: application/octet-stream\r\n\r\n" + data + b"\r\n--" + BOUNDARY + b"--\r\n")


def pm(body: bytes) -> int:
    out = bytearray()
    p = MultipartParser(BOUNDARY, {"on_part_data": lambda d, s, e: out.extend(d[s:e])})
    for i in range(0, len(body), CHUNK):
        p.write(body[i:i + CHUNK])
    p.finalize()
    return len(out)


def stdlib(body: bytes) -> int:
    chunks = [body[i:i + CHUNK] for i in range(0, len(body), CHUNK)]
    whole = b"".join(chunks)
    msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: multipart/form-data; boundary=" + BOUNDARY + b"\r\n\r\n" + whole)
    return sum(len(part.get_payload(decode=True) or b"") for part in msg.iter_parts())  # type: ignore[attr-defined]


def split(body: bytes) -> int:
    whole = b"".join(body[i:i + CHUNK] for i in range(0, len(body), CHUNK))
    n = 0
    for part in whole.split(b"--" + BOUNDARY)[1:-1]:
        _, _, data = part.partition(b"\r\n\r\n")
        n += len(data) - 2
    return n


def main() -> None:
    for size in (1 << 20, 20 << 20):
        body = form(size)
        print(f"form of {len(body) / 1048576:.1f} MiB")
        for name, fn in (("python-multipart", pm), ("stdlib email", stdlib), ("bytes.split", split)):
            times = []
            for _ in range(5):
                t = time.perf_counter()
                fn(body)
                times.append(time.perf_counter() - t)
            print(f"  {name:18s} {statistics.median(times) * 1000:8.1f} ms  ({len(body) / statistics.median(times) / 1e6:7.0f} MB/s)")


if __name__ == "__main__":
    main()
