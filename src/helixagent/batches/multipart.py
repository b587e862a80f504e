"""``multipart/form-data`` uploads (POST /v1/files), parsed as the body streams in with python-multipart's
push parser (chosen by measurement: bench/multipart_parse.py, README "Hot-path dependencies"); the whole
body is bounded (413 past ``batches.max_file_bytes`` plus a little room for the form fields)."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from ..api.http import Request, too_large
from ..errors import bad_request

FIELD_MAX = 4096          # a non-file form field's value
FORM_OVERHEAD = 64 * 1024  # boundaries, part headers and small fields beyond the file itself


@dataclass
class Part:
    name: str
    filename: str | None
    content_type: str | None
    data: bytearray = field(default_factory=bytearray)


async def read_form(req: Request, max_file_bytes: int) -> dict[str, Part]:
    """The form's parts by name (the last one of a name wins); 400 naming what is wrong, 413 past the bound."""
    # imported on the first upload, not at start: 1 MB of RSS in every worker that never takes one
    from python_multipart import MultipartParser
    from python_multipart.exceptions import MultipartParseError
    from python_multipart.multipart import parse_options_header
    ctype, opts = parse_options_header(req.headers.get("content-type", ""))
    if ctype != b"multipart/form-data" or not opts.get(b"boundary"):
        raise bad_request("POST /v1/files takes multipart/form-data (fields 'purpose' and 'file')",
                          param="file", code="invalid_request")
    limit = max_file_bytes + FORM_OVERHEAD
    parts: dict[str, Part] = {}
    cur: dict[str, Any] = {"hname": b"", "hval": b"", "headers": {}, "part": None}

    def on_part_begin() -> None:
        cur["headers"] = {}
        cur["part"] = None

    def on_header_field(data: bytes, start: int, end: int) -> None:
        cur["hname"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        cur["hval"] += data[start:end]

    def on_header_end() -> None:
        cur["headers"][cur["hname"].decode("latin-1").lower()] = cur["hval"]
        cur["hname"], cur["hval"] = b"", b""

    def on_headers_finished() -> None:
        disp, dopts = parse_options_header(cur["headers"].get("content-disposition", b""))
        name = dopts.get(b"name")
        if disp != b"form-data" or name is None:
            raise bad_request("a form part without Content-Disposition: form-data; name=...", param="file",
                              code="invalid_request")
        fn = dopts.get(b"filename")
        ct = cur["headers"].get("content-type")
        cur["part"] = Part(name.decode("utf-8", "replace"), None if fn is None else fn.decode("utf-8", "replace"),
                           None if ct is None else ct.decode("latin-1"))

    def on_part_data(data: bytes, start: int, end: int) -> None:
        p: Part = cur["part"]
        p.data += data[start:end]
        if p.filename is None and len(p.data) > FIELD_MAX:
            raise bad_request(f"the form field {p.name!r} is longer than {FIELD_MAX} bytes", param=p.name,
                              code="invalid_request")
        if len(p.data) > max_file_bytes:
            raise too_large(max_file_bytes)

    def on_part_end() -> None:
        p = cur["part"]
        if p is not None:
            parts[p.name] = p

    parser = MultipartParser(opts[b"boundary"], {
        "on_part_begin": on_part_begin, "on_header_field": on_header_field, "on_header_value": on_header_value,
        "on_header_end": on_header_end, "on_headers_finished": on_headers_finished,
        "on_part_data": on_part_data, "on_part_end": on_part_end})
    cl = req.headers.get("content-length")
    if cl is not None and cl.isdigit() and int(cl) > limit:
        raise too_large(max_file_bytes)
    size = 0
    while True:
        msg = await req.receive()
        if msg["type"] == "http.disconnect":
            raise asyncio.CancelledError("client disconnected")
        chunk = msg.get("body", b"")
        if chunk:
            size += len(chunk)
            if size > limit:
                raise too_large(max_file_bytes)
            try:
                parser.write(chunk)
            except MultipartParseError as exc:
                raise bad_request(f"the multipart body does not parse: {exc}", param="file",
                                  code="invalid_request") from None
        if not msg.get("more_body", False):
            break
    try:
        parser.finalize()
    except MultipartParseError as exc:
        raise bad_request(f"the multipart body does not parse: {exc}", param="file", code="invalid_request") from None
    return parts

