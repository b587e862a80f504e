"""The request pipeline: parse -> authenticate -> limit/budget -> cache -> route -> provider -> record -> respond.

Stages run as pre-hooks in order and post-hooks in reverse (the Bifrost plugin model).  A pre-hook may
short-circuit by returning True after setting ``ctx.response`` or ``ctx.stream`` (a cache hit), or by
raising a ``GatewayError`` (a limit rejection); the post-hooks of the stages already entered still run.
For a streamed answer the post-hooks run when the stream has ended (completed, failed or abandoned),
with ``ctx.response`` holding the accumulated answer.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from typing import Any, AsyncIterator, Awaitable, Callable, Literal

from . import streamed
from .canonical import ChatResponse, Usage
from .errors import GatewayError
from .stage import Stage as Stage  # re-exported: the stages import it from here

log = logging.getLogger("helixagent.pipeline")

# Request ids: 64 random bits per process + a counter -- unique across processes and restarts, and
# about 20x cheaper than uuid4() on the hot path.
_ID_PREFIX = os.urandom(8).hex()
_ID_COUNTER = itertools.count(1)


def _reseed() -> None:  # a forked worker must not repeat its parent's ids
    global _ID_PREFIX, _ID_COUNTER
    _ID_PREFIX = os.urandom(8).hex()
    _ID_COUNTER = itertools.count(1)


os.register_at_fork(after_in_child=_reseed)


def new_request_id() -> str:
    return _ID_PREFIX + "%012x" % next(_ID_COUNTER)


class Identity:
    """Who is calling: filled by the auth stage."""

    __slots__ = ("key_id", "user_id", "application", "role", "limits", "is_master")

    def __init__(self, key_id: str | None = None, user_id: str | None = None, application: str | None = None,
                 role: str = "admin", limits: dict[str, Any] | None = None, is_master: bool = False):
        self.key_id = key_id
        self.user_id = user_id
        self.application = application
        self.role = role
        self.limits = limits or {}
        self.is_master = is_master


# A request's priority in the provider queues (routing/queue.py): set it on ``RequestContext.priority``
# before running the pipeline (the batch runner sets "low"); left None, the priority stage takes it from
# the x-helixagent-priority header or the key's default (routing/priority.py).
Priority = Literal["high", "normal", "low"]
PRIORITIES: tuple[Priority, ...] = ("high", "normal", "low")

ANONYMOUS_LOCAL = Identity(key_id=None, user_id=None, application=None, role="admin")


class RequestContext:
    __slots__ = (
        "request_id", "client_request_id", "started", "started_wall", "endpoint", "client_format", "method", "path",
        "ip", "user_agent", "headers", "identity", "request", "raw_body", "provider", "upstream_model", "response",
        "stream", "error", "status", "usage", "cost", "cache_status", "streamed", "first_token_at",
        "finished_at", "response_headers", "attempts", "fallbacks", "retries", "state", "stream_listeners",
        "candidates_tried", "estimated_tokens", "client_disconnected", "upstream_latency", "status_sent",
        "outcome", "priority",
    )

    def __init__(self, endpoint: str, client_format: str = "openai", request_id: str | None = None,
                 client_request_id: str | None = None):
        # HelixAgent's own id (the record's key, x-helixagent-request-id); a client-supplied X-Request-ID
        # is kept apart in client_request_id: clients may repeat it, and a repeat must not collide.
        self.request_id = request_id or new_request_id()
        self.client_request_id = client_request_id
        self.started = time.perf_counter()
        self.started_wall = time.time()
        self.endpoint = endpoint
        self.client_format = client_format
        self.method = "POST"
        self.path = ""
        self.ip = ""
        self.user_agent = ""
        self.headers: dict[str, str] = {}
        self.identity: Identity | None = None
        self.request: Any = None
        self.raw_body = b""
        self.provider: str | None = None
        self.upstream_model: str | None = None
        self.response: ChatResponse | Any | None = None
        self.stream: AsyncIterator[dict[str, Any]] | None = None
        self.error: GatewayError | None = None
        self.status = 200
        self.usage: Usage | None = None
        self.cost = 0.0
        self.cache_status: str | None = None
        self.streamed = False
        self.first_token_at: float | None = None
        self.finished_at: float | None = None
        self.response_headers: dict[str, str] = {}
        self.attempts = 0
        self.fallbacks = 0
        self.retries = 0
        self.state: dict[str, Any] = {}
        self.stream_listeners: list[Callable[[dict[str, Any] | None], None]] = []
        self.candidates_tried: list[str] = []
        self.estimated_tokens = 0
        self.client_disconnected = False
        self.upstream_latency: float | None = None
        # what the client saw: the status of the response head the server accepted (None: no head was
        # sent), and how the response ended (see OUTCOMES; set by finish() unless a caller knows better)
        self.status_sent: int | None = None
        self.outcome: str | None = None
        self.priority: Priority | None = None  # see PRIORITIES; None until the priority stage resolves it

    @property
    def latency(self) -> float:
        return (self.finished_at or time.perf_counter()) - self.started

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - self.started


# How a response ended, as recorded (store/schema.py ``outcome``):
#   completed       -- the answer was delivered in full
#   error           -- an error response was delivered in full (status and error_type say which)
#   upstream_error  -- a stream had started (status 200 sent) and ended with an error event: the upstream
#                      failed mid-way (or timed out)
#   client_gone     -- the client disconnected before the answer was complete
#   shutdown        -- the gateway's shutdown drain ended first: the client got a last error event
#                      (or a 503 when no answer had started)
#   response_failed -- the server refused to send the response (nothing reached the client)
OUTCOMES = ("completed", "error", "upstream_error", "client_gone", "shutdown", "response_failed")


def shutdown_error() -> GatewayError:
    return GatewayError(503, "the gateway is shutting down and could not finish this request in time; retry it",
                        type="service_unavailable", code="server_shutting_down", retryable=True, kind="shutdown")


def outcome_of(ctx: "RequestContext") -> str:
    err = ctx.error
    if err is None:
        return "completed"
    if ctx.client_disconnected or err.kind == "client_disconnected":
        return "client_gone"
    if err.kind == "shutdown":
        return "shutdown"
    if err.kind == "response_failed":
        return "response_failed"
    sent = ctx.status_sent
    if sent is not None and sent < 400:
        return "upstream_error"
    return "error"


def partial_usage(ctx: "RequestContext") -> Usage:
    """Tokens of a stream that ended before the upstream reported its usage: the prompt as estimated
    locally, and the text received so far (tokens.py: the same estimate the limits settle with)."""
    from .tokens import estimate_messages, estimate_text
    prompt = ctx.estimated_tokens
    req = ctx.request
    if not prompt and req is not None and isinstance(getattr(req, "messages", None), list):
        prompt = estimate_messages(req.messages, req.params.get("tools"))
    text = ""
    body = getattr(ctx.response, "body", None) or {}
    for ch in body.get("choices") or ():
        msg = ch.get("message") or {}
        text += (msg.get("content") or "") + (msg.get("reasoning_content") or "")
        for tc in msg.get("tool_calls") or ():
            fn = tc.get("function") or {}
            text += (fn.get("name") or "") + (fn.get("arguments") or "")
    completion = estimate_text(text)
    return Usage(prompt, completion, prompt + completion)


_NO_POST = Stage.post

Handler = Callable[[RequestContext], Awaitable[None]]


class Pipeline:
    def __init__(self, stages: list[Stage], handler: Handler):
        self.stages = list(stages)
        self.handler = handler

    async def run(self, ctx: RequestContext) -> list[Stage]:
        """Run pre-hooks and the handler.  Returns the stages entered; call :meth:`finish` with them
        once the outcome is final (immediately for a non-streamed answer, at stream end otherwise)."""
        entered: list[Stage] = []
        try:
            for st in self.stages:
                entered.append(st)
                if await st.pre(ctx):
                    break
            else:
                await self.handler(ctx)
        except GatewayError as exc:
            ctx.error = exc
            ctx.stream = None
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is None:
                raise
            # Either the client hung up while we waited (api.http.DisconnectWatch; the caller finishes
            # with a 499), or the server cancelled the request because its shutdown drain ended (the
            # caller answers 503).  The wait was cancelled, which abandons the upstream request; the
            # post-hooks still run.
            task.uncancel()
            if not ctx.client_disconnected:
                ctx.error = shutdown_error()
            stream, ctx.stream = ctx.stream, None
            closer = getattr(stream, "aclose", None)
            if closer is not None:
                asyncio.ensure_future(closer())
        except Exception as exc:  # a bug must not kill the worker nor lose the record
            log.exception("pipeline failure in request %s", ctx.request_id)
            ctx.error = GatewayError(500, f"internal error: {type(exc).__name__}", kind="internal")
            ctx.stream = None
        return entered

    async def run_rejected(self, ctx: RequestContext) -> list[Stage]:
        """For a request that failed before the pipeline (ctx.error set): the outer stages to finish."""
        return [st for st in self.stages if st.outer]

    async def finish(self, ctx: RequestContext, entered: list[Stage]) -> None:
        if ctx.finished_at is None:
            ctx.finished_at = time.perf_counter()
        err = ctx.error
        if err is not None:
            ctx.status = err.status
            # the traceback's frames hold this ctx (and its body): a cycle that only the garbage collector
            # would free, so every rejected request would stay in memory until the next collection
            err.__traceback__ = None
        if ctx.usage is None and ctx.response is not None:
            ctx.usage = getattr(ctx.response, "usage", None)
        if ctx.outcome is None:
            ctx.outcome = outcome_of(ctx)
        for st in reversed(entered):
            if type(st).post is _NO_POST:
                continue  # a stage without a post-hook: no coroutine to create and await
            try:
                await st.post(ctx)
            except Exception:
                log.exception("post-hook %s failed for request %s", st.name, ctx.request_id)

    async def abandon(self, ctx: RequestContext, entered: list[Stage]) -> None:
        """A stream whose response could not be started: close the upstream stream, then finish."""
        stream, ctx.stream = ctx.stream, None
        try:
            if stream is not None:
                # An async generator that never ran would skip its ``finally`` (which closes the upstream
                # response) on aclose(): let it reach its first yield (the relay's first chunk is already
                # there; a stream still waiting is cancelled after a second, which runs it too).
                try:
                    await asyncio.wait_for(stream.__anext__(), 1.0)
                except (StopAsyncIteration, asyncio.TimeoutError, GatewayError):
                    pass
                closer = getattr(stream, "aclose", None)
                if closer is not None:
                    await closer()
        finally:
            await self.finish(ctx, entered)

    def iterate(self, ctx: RequestContext, entered: list[Stage]) -> AsyncIterator[dict[str, Any]]:
        """Iterate ``ctx.stream``, accumulating the answer; runs the post-hooks when the stream ends
        (:func:`helixagent.streamed.iterate`, an async generator: kept out of this compiled module).

        A failure mid-stream sets ``ctx.error`` and ends the iteration; the caller renders the error
        event in the client's format."""
        return streamed.iterate(self, ctx, entered)
