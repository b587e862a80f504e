"""Optional OpenTelemetry tracing: a span per request and a child span per upstream call.

On only when ``tracing.enabled`` is true AND the ``opentelemetry-api`` package is importable; otherwise
the gateway says so once at start-up and nothing is on the request path.  The spans go to the tracer
provider the process has: configure it the usual OpenTelemetry way (``opentelemetry-instrument``, or the
``OTEL_*`` environment variables).  When ``opentelemetry-sdk`` is installed and no provider is set,
HelixAgent sets one up itself with ``service.name = tracing.service_name`` and, if the OTLP exporter
package is installed, an OTLP exporter (``OTEL_EXPORTER_OTLP_ENDPOINT``).
"""
from __future__ import annotations

import contextvars
import functools
import logging
from typing import Any, AsyncIterator

log = logging.getLogger("helixagent.tracing")

# The request span of the current task (pre-hooks, the handler and post-hooks run in one task).
_REQUEST_SPAN: contextvars.ContextVar[Any] = contextvars.ContextVar("helixagent_request_span", default=None)


class Tracing:
    def __init__(self, tracer: Any, trace_mod: Any):
        self.tracer = tracer
        self.trace = trace_mod
        from opentelemetry.trace import SpanKind, Status, StatusCode
        self.SpanKind = SpanKind
        self.Status = Status
        self.StatusCode = StatusCode

    # -- request span ----------------------------------------------------------------------------------
    def start(self, ctx: Any) -> None:
        span = self.tracer.start_span(f"{ctx.method} {ctx.endpoint}", kind=self.SpanKind.SERVER, attributes={
            "http.request.method": ctx.method, "url.path": ctx.path, "helixagent.request_id": ctx.request_id,
            "helixagent.endpoint": ctx.endpoint})
        if ctx.client_request_id:
            span.set_attribute("helixagent.client_request_id", ctx.client_request_id)
        ctx.state["otel_span"] = span
        _REQUEST_SPAN.set(span)

    def end(self, ctx: Any) -> None:
        span = ctx.state.pop("otel_span", None)
        if span is None:  # rejected before the pipeline: a span for it all the same
            span = self.tracer.start_span(f"{ctx.method} {ctx.endpoint}", kind=self.SpanKind.SERVER)
            span.set_attribute("helixagent.request_id", ctx.request_id)
        span.set_attribute("http.response.status_code", ctx.status)
        if ctx.provider:
            span.set_attribute("gen_ai.system", ctx.provider)
        if ctx.upstream_model:
            span.set_attribute("gen_ai.response.model", ctx.upstream_model)
        u = ctx.usage
        if u is not None:
            span.set_attribute("gen_ai.usage.input_tokens", u.prompt_tokens)
            span.set_attribute("gen_ai.usage.output_tokens", u.completion_tokens)
        if ctx.cache_status:
            span.set_attribute("helixagent.cache", ctx.cache_status)
        if ctx.fallbacks:
            span.set_attribute("helixagent.fallbacks", ctx.fallbacks)
        if ctx.error is not None:
            span.set_status(self.Status(self.StatusCode.ERROR, ctx.error.kind or "error"))
            span.set_attribute("error.type", ctx.error.kind or str(ctx.error.status))
        span.end()
        if _REQUEST_SPAN.get() is span:
            _REQUEST_SPAN.set(None)

    # -- upstream spans ----------------------------------------------------------------------------------
    def _child(self, provider: Any, op: str, model: str) -> Any:
        parent = _REQUEST_SPAN.get()
        context = self.trace.set_span_in_context(parent) if parent is not None else None
        return self.tracer.start_span(f"{op} {provider.name}", context=context, kind=self.SpanKind.CLIENT,
                                      attributes={"gen_ai.system": provider.name,
                                                  "gen_ai.request.model": model or "",
                                                  "helixagent.provider_type": provider.cfg.type or "",
                                                  "gen_ai.operation.name": op})

    def _fail(self, span: Any, exc: BaseException) -> None:
        span.set_status(self.Status(self.StatusCode.ERROR, type(exc).__name__))
        kind = getattr(exc, "kind", None)
        span.set_attribute("error.type", kind or type(exc).__name__)

    def instrument(self, provider: Any) -> None:
        """Wrap one provider's upstream calls in spans (only done when tracing is on)."""
        tr = self

        def wrap_call(fn: Any, op: str) -> Any:
            @functools.wraps(fn)
            async def call(req: Any, *args: Any) -> Any:
                span = tr._child(provider, op, getattr(req, "model", ""))
                try:
                    out = await fn(req, *args)
                except BaseException as exc:
                    tr._fail(span, exc)
                    span.end()
                    raise
                u = getattr(out, "usage", None)
                if u is not None and hasattr(u, "prompt_tokens"):
                    span.set_attribute("gen_ai.usage.input_tokens", u.prompt_tokens)
                    span.set_attribute("gen_ai.usage.output_tokens", u.completion_tokens)
                span.end()
                return out
            return call

        def wrap_stream(fn: Any) -> Any:
            @functools.wraps(fn)
            async def call(req: Any, *args: Any) -> Any:
                span = tr._child(provider, "chat.stream", getattr(req, "model", ""))
                try:
                    it = await fn(req, *args)
                except BaseException as exc:
                    tr._fail(span, exc)
                    span.end()
                    raise
                return _SpanStream(it, span, tr)
            return call

        # The router calls ``send`` (the upstream exchange, after the mapping step): one span per call.
        send = provider.send
        by_op = {"chat": wrap_call(lambda req, wire: send(req, "chat", wire), "chat"),
                 "embed": wrap_call(lambda req, wire: send(req, "embed", wire), "embeddings"),
                 "stream": wrap_stream(lambda req, wire: send(req, "stream", wire))}

        async def traced_send(req: Any, op: str, wire: Any) -> Any:
            return await by_op[op](req, wire)

        provider.send = traced_send


class _SpanStream:
    """An upstream stream whose span ends with the stream."""

    def __init__(self, it: AsyncIterator[Any], span: Any, tr: Tracing):
        self.it = it
        self.span = span
        self.tr = tr
        self.ended = False
        self.chunks = 0

    def __aiter__(self) -> "_SpanStream":
        return self

    async def __anext__(self) -> Any:
        try:
            chunk = await self.it.__anext__()
        except StopAsyncIteration:
            self._end(None)
            raise
        except BaseException as exc:
            self._end(exc)
            raise
        self.chunks += 1
        return chunk

    def _end(self, exc: BaseException | None) -> None:
        if self.ended:
            return
        self.ended = True
        if exc is not None and not isinstance(exc, GeneratorExit):
            self.tr._fail(self.span, exc)
        self.span.set_attribute("helixagent.chunks", self.chunks)
        self.span.end()

    async def aclose(self) -> None:
        self._end(None)
        closer = getattr(self.it, "aclose", None)
        if closer is not None:
            await closer()


def setup_tracing(cfg: Any) -> Tracing | None:
    if not cfg.tracing.enabled:
        return None
    try:
        from opentelemetry import trace
    except ImportError:
        log.info("tracing.enabled is true but the opentelemetry-api package is not installed; tracing is off "
                 "(pip install opentelemetry-api opentelemetry-sdk)")
        return None
    _default_provider(trace, cfg.tracing.service_name)
    return Tracing(trace.get_tracer("helixagent"), trace)


def _default_provider(trace: Any, service_name: str) -> None:
    """Set up an SDK tracer provider when the process has none and the SDK is installed."""
    current = trace.get_tracer_provider()
    if type(current).__name__ not in ("ProxyTracerProvider", "NoOpTracerProvider"):
        return  # configured by the application or opentelemetry-instrument
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        log.info("tracing: opentelemetry-sdk is not installed; spans go to whatever tracer provider the process "
                 "sets (none: they are dropped)")
        return
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    except ImportError:
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        except ImportError:
            OTLPSpanExporter = None  # type: ignore[assignment, unused-ignore]
    if OTLPSpanExporter is not None:
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    else:
        log.info("tracing: no OTLP exporter package installed (opentelemetry-exporter-otlp); add a span "
                 "processor to the tracer provider to export spans")
    trace.set_tracer_provider(provider)
