"""Fake vendor batch APIs over real HTTP, written to the documented formats, for the native batch mode.

OpenAI (https://platform.openai.com/docs/api-reference/batch): ``POST /v1/files`` (multipart, purpose
batch), ``GET /v1/files/{id}/content``, ``POST /v1/batches``, ``GET /v1/batches/{id}``, ``POST
/v1/batches/{id}/cancel``, ``GET /v1/batches`` -- a batch is ``validating``, then ``in_progress``, and
``completed`` after :attr:`polls` retrievals (``cancelling`` -> ``cancelled`` on cancel), its output file
lines ``{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}``; a line whose
model is ``missing-model`` gets a 404 in the error file.

Anthropic (https://docs.anthropic.com/en/api/creating-message-batches): ``POST /v1/messages/batches``,
``GET /v1/messages/batches/{id}``, ``POST .../cancel``, ``GET .../results`` (JSONL at ``results_url``,
absolute); ``ended`` after :attr:`polls` retrievals.  Both check their key and record every call."""
from __future__ import annotations

import datetime as dt
import time
import uuid
from typing import Any

import orjson
from aiohttp import web

from support.servers import AiohttpServer


def _chat_body(model: str, body: dict[str, Any]) -> dict[str, Any]:
    last = str((body.get("messages") or [{}])[-1].get("content", ""))
    words = ["batched", "answer", "to", *last.split()[:3]]
    p, c = 7 + len(last.split()), len(words)
    return {"id": "chatcmpl-" + uuid.uuid4().hex[:12], "object": "chat.completion", "created": int(time.time()),
            "model": model, "system_fingerprint": "fp_batch",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": " ".join(words), "refusal": None},
                         "logprobs": None, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}}


def _iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).isoformat().replace("+00:00", "Z")


class FakeVendorBatches:
    def __init__(self, openai_key: str = "sk-batch-upstream-key", anthropic_key: str = "sk-ant-batch-key",
                 polls: int = 2):
        self.openai_key = openai_key
        self.anthropic_key = anthropic_key
        self.polls = polls
        self.calls: list[tuple[str, str]] = []
        self.files: dict[str, dict[str, Any]] = {}
        self.batches: dict[str, dict[str, Any]] = {}
        self.msg_batches: dict[str, dict[str, Any]] = {}
        self.results_base: str | None = None  # where an ended Message Batch's results_url points (None: here)
        app = web.Application(client_max_size=256 * 1024 * 1024)
        r = app.router
        r.add_post("/v1/files", self.upload)
        r.add_get("/v1/files/{id}/content", self.content)
        r.add_post("/v1/batches", self.create)
        r.add_get("/v1/batches", self.list)
        r.add_get("/v1/batches/{id}", self.retrieve)
        r.add_post("/v1/batches/{id}/cancel", self.cancel)
        r.add_post("/v1/messages/batches", self.a_create)
        r.add_get("/v1/messages/batches/{id}", self.a_retrieve)
        r.add_post("/v1/messages/batches/{id}/cancel", self.a_cancel)
        r.add_get("/v1/messages/batches/{id}/results", self.a_results)
        self.server = AiohttpServer(app)

    @property
    def url(self) -> str:
        return self.server.url

    def openai_provider(self, name: str = "openai", **extra: Any) -> dict[str, Any]:
        return {"name": name, "type": "openai", "base_url": self.url + "/v1", "api_key": self.openai_key,
                "models": ["gpt-4o-mini"], "priority": 1, **extra}

    def anthropic_provider(self, name: str = "claude", **extra: Any) -> dict[str, Any]:
        return {"name": name, "type": "anthropic", "base_url": self.url, "api_key": self.anthropic_key,
                "models": ["claude-haiku-4-5"], "priority": 1, **extra}

    def reset(self) -> None:
        self.calls.clear()
        self.files.clear()
        self.batches.clear()
        self.msg_batches.clear()
        self.results_base = None

    def close(self) -> None:
        self.server.close()

    # -- OpenAI ---------------------------------------------------------------------------------------
    def _auth(self, request: web.Request) -> web.Response | None:
        self.calls.append((request.method, request.path))
        if request.headers.get("authorization") != f"Bearer {self.openai_key}":
            return web.json_response({"error": {"message": "Incorrect API key provided", "type": "invalid_request_error",
                                                "param": None, "code": "invalid_api_key"}}, status=401)
        return None

    async def upload(self, request: web.Request) -> web.Response:
        bad = self._auth(request)
        if bad is not None:
            return bad
        form = await request.post()
        f = form.get("file")
        if form.get("purpose") != "batch" or not isinstance(f, web.FileField):
            return web.json_response({"error": {"message": "purpose batch and a file are required",
                                                "type": "invalid_request_error", "param": "file", "code": None}},
                                     status=400)
        data = f.file.read()
        fid = "file-" + uuid.uuid4().hex[:24]
        self.files[fid] = {"id": fid, "object": "file", "bytes": len(data), "created_at": int(time.time()),
                           "filename": f.filename, "purpose": "batch", "status": "processed", "data": data}
        return web.json_response({k: v for k, v in self.files[fid].items() if k != "data"})

    async def content(self, request: web.Request) -> web.Response:
        bad = self._auth(request)
        if bad is not None:
            return bad
        f = self.files.get(request.match_info["id"])
        if f is None:
            return web.json_response({"error": {"message": "No such File object", "type": "invalid_request_error",
                                                "param": "id", "code": None}}, status=404)
        return web.Response(body=f["data"], content_type="application/octet-stream")

    async def create(self, request: web.Request) -> web.Response:
        bad = self._auth(request)
        if bad is not None:
            return bad
        body = await request.json()
        f = self.files.get(body.get("input_file_id"))
        if f is None:
            return web.json_response({"error": {"message": "No such File", "type": "invalid_request_error",
                                                "param": "input_file_id", "code": None}}, status=400)
        lines = [orjson.loads(x) for x in f["data"].splitlines() if x.strip()]
        bid = "batch_" + uuid.uuid4().hex[:24]
        now = int(time.time())
        self.batches[bid] = {
            "id": bid, "object": "batch", "endpoint": body["endpoint"], "errors": None,
            "input_file_id": f["id"], "completion_window": body["completion_window"], "status": "validating",
            "output_file_id": None, "error_file_id": None, "created_at": now, "in_progress_at": None,
            "expires_at": now + 86400, "finalizing_at": None, "completed_at": None, "failed_at": None,
            "expired_at": None, "cancelling_at": None, "cancelled_at": None,
            "request_counts": {"total": len(lines), "completed": 0, "failed": 0},
            "metadata": body.get("metadata"), "_lines": lines, "_polls": 0}
        return web.json_response(self._public(self.batches[bid]))

    @staticmethod
    def _public(b: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in b.items() if not k.startswith("_")}

    def _advance(self, b: dict[str, Any]) -> None:
        b["_polls"] += 1
        now = int(time.time())
        if b["status"] == "validating":
            b["status"], b["in_progress_at"] = "in_progress", now
        elif b["status"] in ("in_progress", "cancelling") and b["_polls"] >= self.polls:
            cancelled = b["status"] == "cancelling"
            out, err = [], []
            for i, line in enumerate(b["_lines"]):
                rid = f"batch_req_{uuid.uuid4().hex[:16]}"
                if cancelled and i % 2:
                    continue  # not run before the cancel: in neither file
                model = line["body"].get("model")
                if model == "missing-model":
                    err.append({"id": rid, "custom_id": line["custom_id"], "response": {
                        "status_code": 404, "request_id": "req_" + uuid.uuid4().hex[:8],
                        "body": {"error": {"message": f"The model `{model}` does not exist", "type": "invalid_request_error",
                                           "param": None, "code": "model_not_found"}}}, "error": None})
                else:
                    out.append({"id": rid, "custom_id": line["custom_id"], "response": {
                        "status_code": 200, "request_id": "req_" + uuid.uuid4().hex[:8],
                        "body": _chat_body(model, line["body"])}, "error": None})
            for kind, rows in (("output", out), ("error", err)):
                if rows:
                    fid = "file-" + uuid.uuid4().hex[:24]
                    data = b"".join(orjson.dumps(x) + b"\n" for x in rows)
                    self.files[fid] = {"id": fid, "object": "file", "bytes": len(data), "created_at": now,
                                       "filename": f"{kind}.jsonl", "purpose": "batch_output", "status": "processed",
                                       "data": data}
                    b[f"{kind}_file_id"] = fid
            b["request_counts"].update(completed=len(out), failed=len(err))
            b["finalizing_at"] = now
            b["status"] = "cancelled" if cancelled else "completed"
            b["cancelled_at" if cancelled else "completed_at"] = now

    async def retrieve(self, request: web.Request) -> web.Response:
        bad = self._auth(request)
        if bad is not None:
            return bad
        b = self.batches.get(request.match_info["id"])
        if b is None:
            return web.json_response({"error": {"message": "No batch found", "type": "invalid_request_error",
                                                "param": None, "code": None}}, status=404)
        self._advance(b)
        return web.json_response(self._public(b))

    async def list(self, request: web.Request) -> web.Response:
        bad = self._auth(request)
        if bad is not None:
            return bad
        data = [self._public(b) for b in reversed(list(self.batches.values()))]
        return web.json_response({"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                                  "last_id": data[-1]["id"] if data else None, "has_more": False})

    async def cancel(self, request: web.Request) -> web.Response:
        bad = self._auth(request)
        if bad is not None:
            return bad
        b = self.batches.get(request.match_info["id"])
        if b is None:
            return web.json_response({"error": {"message": "No batch found"}}, status=404)
        if b["status"] in ("validating", "in_progress"):
            b["status"], b["cancelling_at"] = "cancelling", int(time.time())
        return web.json_response(self._public(b))

    # -- Anthropic ------------------------------------------------------------------------------------
    def _a_auth(self, request: web.Request) -> web.Response | None:
        self.calls.append((request.method, request.path))
        if request.headers.get("x-api-key") != self.anthropic_key or not request.headers.get("anthropic-version"):
            return web.json_response({"type": "error", "error": {"type": "authentication_error",
                                                                 "message": "invalid x-api-key"}}, status=401)
        return None

    def _a_public(self, b: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in b.items() if not k.startswith("_")}

    async def a_create(self, request: web.Request) -> web.Response:
        bad = self._a_auth(request)
        if bad is not None:
            return bad
        body = await request.json()
        reqs = body["requests"]
        bid = "msgbatch_" + uuid.uuid4().hex[:24]
        now = time.time()
        self.msg_batches[bid] = {
            "id": bid, "type": "message_batch", "processing_status": "in_progress",
            "request_counts": {"processing": len(reqs), "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0},
            "ended_at": None, "created_at": _iso(now), "expires_at": _iso(now + 86400), "archived_at": None,
            "cancel_initiated_at": None, "results_url": None, "_reqs": reqs, "_polls": 0, "_results": []}
        return web.json_response(self._a_public(self.msg_batches[bid]))

    async def a_retrieve(self, request: web.Request) -> web.Response:
        bad = self._a_auth(request)
        if bad is not None:
            return bad
        b = self.msg_batches.get(request.match_info["id"])
        if b is None:
            return web.json_response({"type": "error", "error": {"type": "not_found_error", "message": "nope"}},
                                     status=404)
        b["_polls"] += 1
        if b["processing_status"] != "ended" and b["_polls"] >= self.polls:
            canceled = b["cancel_initiated_at"] is not None
            rc = {"processing": 0, "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0}
            for i, r in enumerate(b["_reqs"]):
                p = r["params"]
                if canceled and i % 2:
                    res: dict[str, Any] = {"type": "canceled"}
                    rc["canceled"] += 1
                elif p.get("model") == "missing-model":
                    res = {"type": "errored", "error": {"type": "error", "error": {
                        "type": "not_found_error", "message": "model: missing-model"}}}
                    rc["errored"] += 1
                else:
                    last = str(p["messages"][-1]["content"])
                    res = {"type": "succeeded", "message": {
                        "id": "msg_" + uuid.uuid4().hex[:12], "type": "message", "role": "assistant",
                        "model": p["model"], "content": [{"type": "text", "text": f"batched reply to {last}"}],
                        "stop_reason": "end_turn", "stop_sequence": None,
                        "usage": {"input_tokens": 9, "output_tokens": 5}}}
                    rc["succeeded"] += 1
                b["_results"].append({"custom_id": r["custom_id"], "result": res})
            b.update(processing_status="ended", request_counts=rc, ended_at=_iso(time.time()),
                     results_url=f"{self.results_base or self.url}/v1/messages/batches/{b['id']}/results")
        return web.json_response(self._a_public(b))

    async def a_cancel(self, request: web.Request) -> web.Response:
        bad = self._a_auth(request)
        if bad is not None:
            return bad
        b = self.msg_batches[request.match_info["id"]]
        if b["processing_status"] == "in_progress":
            b.update(processing_status="canceling", cancel_initiated_at=_iso(time.time()))
        return web.json_response(self._a_public(b))

    async def a_results(self, request: web.Request) -> web.Response:
        bad = self._a_auth(request)
        if bad is not None:
            return bad
        b = self.msg_batches[request.match_info["id"]]
        data = b"".join(orjson.dumps(x) + b"\n" for x in b["_results"])
        return web.Response(body=data, content_type="application/binary")
