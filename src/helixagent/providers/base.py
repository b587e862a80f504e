"""The provider interface.  Each vendor module gives the same parts (the Portkey layout): endpoint and
headers, request mapping (canonical -> vendor), response transform (vendor -> canonical), stream-chunk
transform (vendor events -> canonical chunks), and error mapping."""
from __future__ import annotations

from typing import Any, AsyncIterator

import orjson

from ..canonical import ChatRequest, ChatResponse, EmbeddingRequest, EmbeddingResponse
from ..config import HTTPConfig, ProviderConfig
from ..errors import GatewayError, bad_request
from ..redaction import REGISTRY
from .http import UpstreamHTTP



# What a transform of malformed upstream JSON raises (wrong types, missing keys); see read_answer.
_UNREADABLE = (TypeError, ValueError, KeyError, AttributeError, IndexError)


async def iter_chunks(chunks: list[dict[str, Any]]) -> AsyncIterator[dict[str, Any]]:
    """A complete list of canonical chunks as a stream."""
    for c in chunks:
        yield c


class Provider:
    """Base class.  Subclasses implement chat/stream (and embed where the vendor has it)."""

    wire = "base"
    stand_in_for: str | None = None  # set when a mock stands in for a provider that has no key

    def __init__(self, cfg: ProviderConfig, http: HTTPConfig):
        self.cfg = cfg
        self.name = cfg.name
        self.http = UpstreamHTTP(cfg, http)

    # -- routing helpers ------------------------------------------------------------------------
    def serves(self, model: str) -> bool:
        """Whether this provider serves ``model`` when the client does not pin a provider.  With no
        ``models:`` list, the catalogue's models for the provider type (with aliases and snapshots)."""
        if self.cfg.models:
            return model in self.cfg.models
        from .catalogue import known
        return known(self.cfg.type, model)

    def models(self) -> list[str]:
        if self.cfg.models:
            return list(self.cfg.models)
        from .catalogue import models_for
        return models_for(self.cfg.type)

    # -- the two steps of a call -----------------------------------------------------------------
    # ``prepare`` maps the canonical request to the vendor's wire request: pure, no I/O, and the only
    # step that reads client input.  Input it cannot map is a 400 GatewayError naming the field; any
    # other exception there is a gateway bug (the router answers 500 and never counts it against the
    # provider).  ``send`` is the upstream exchange with a prepared request: only its failures (and
    # answers it cannot read, ``bad_upstream_body``) are the provider's.  ``chat``/``stream``/``embed``
    # are both steps in one call.  An adapter with no separate mapping step keeps the default ``prepare``
    # (None) and ``send`` (which calls its ``chat``/``stream``/``embed``).
    def prepare(self, req: Any, op: str) -> Any:
        """The wire request for ``op`` ("chat", "stream" or "embed"); see above."""
        return None

    async def send(self, req: Any, op: str, wire: Any) -> Any:
        """Run the upstream exchange for a request ``prepare`` mapped to ``wire``."""
        if op == "chat":
            return await self.chat(req)
        if op == "stream":
            return await self.stream(req)
        return await self.embed(req)

    # -- operations -------------------------------------------------------------------------------
    async def chat(self, req: ChatRequest) -> ChatResponse:
        raise NotImplementedError

    async def stream(self, req: ChatRequest) -> AsyncIterator[dict[str, Any]]:
        """Open the upstream stream.  Must raise before returning if the upstream fails before the
        first byte, so routing can fail over; returns an async iterator of canonical chunks."""
        raise NotImplementedError

    async def embed(self, req: EmbeddingRequest) -> EmbeddingResponse:
        raise GatewayError(400, f"provider {self.name!r} ({self.cfg.type}) does not offer embeddings",
                           code="unsupported_feature", param="model", provider=self.name)

    async def close(self) -> None:
        await self.http.close()

    # -- shared helpers ---------------------------------------------------------------------------
    def map_error(self, status: int, data: bytes, headers: Any = None) -> GatewayError:
        """The vendor's error response as a GatewayError (vendors with their own error shape override)."""
        return self.upstream_error(status, data, headers)

    def bad_body(self, what: str = "an unexpected body") -> GatewayError:
        return GatewayError(502, f"provider {self.name!r} returned {what}", provider=self.name, retryable=True,
                            kind="bad_upstream_body")

    def stream_error(self, what: str, sep: str = " ") -> GatewayError:
        """A broken upstream stream (retryable: before the first chunk routing may fail over)."""
        return GatewayError(502, f"provider {self.name!r}{sep}{self.scrub(what)}", type="upstream_error",
                            code="upstream_stream_error", provider=self.name, retryable=True, kind="stream_error")

    def stream_event(self, data: bytes) -> Any:
        """One SSE data payload as JSON, or a stream error."""
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError:
            raise self.stream_error("sent a malformed stream event") from None

    async def post_json(self, url: str, body: bytes, headers: dict[str, str]) -> tuple[dict[str, Any], Any, bytes]:
        """POST, map a non-200 answer to an error, parse the JSON object: (object, headers, raw bytes)."""
        status, h, data = await self.http.post(url, body, headers)
        if status != 200:
            raise self.map_error(status, data, h)
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise self.bad_body("a body that is not JSON") from None
        if not isinstance(obj, dict):
            raise self.bad_body()
        return obj, h, data

    async def open_sse(self, url: str, body: bytes, headers: dict[str, str]) -> Any:
        """Open a streamed POST; a non-200 answer is read, closed and raised as an error (before the
        first byte reaches the client, so routing can still fail over)."""
        resp = await self.http.open_stream(url, body, headers)
        if resp.status != 200:
            try:
                data = await resp.read()
            finally:
                resp.close()
            raise self.map_error(resp.status, data, resp.headers)
        return resp

    # -- a streamed request answered with one JSON document -------------------------------------------
    @staticmethod
    def is_json_answer(resp: Any) -> bool:
        """Whether a 200 answer to a streamed request is a plain JSON document rather than SSE (some
        servers ignore ``stream: true``, or answer a cached completion whole)."""
        ct: str | None = resp.headers.get("content-type")
        if not ct:
            return False
        ct = ct.partition(";")[0].strip().lower()
        return ct == "application/json" or ct.endswith("+json")

    async def json_answer(self, resp: Any) -> Any:
        """Read, close and parse a JSON answer to a streamed request (bad_upstream_body if it is not)."""
        try:
            data = await resp.read()
        finally:
            resp.close()
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError:
            raise self.bad_body("a stream answer that is neither SSE nor JSON") from None

    def read_answer(self, fn: Any, *args: Any) -> Any:
        """Run a vendor -> canonical transform over an upstream answer.  The answer is the provider's:
        a shape the transform cannot read (a list where an object belongs, a missing key) is
        ``bad_upstream_body`` (502, retryable, counted against the provider), not a gateway crash."""
        try:
            return fn(*args)
        except _UNREADABLE as exc:
            raise self.bad_body(f"an answer the gateway could not read ({type(exc).__name__})") from None

    def scrub(self, text: str) -> str:
        """Remove secrets from an upstream message before it is relayed, recorded or logged: every secret
        of the configuration (every provider's key and header values, the master key, encryption keys,
        URL passwords: :mod:`helixagent.redaction`), this provider's own key, anything key-shaped."""
        key = self.cfg.api_key
        if key and key in text:
            text = text.replace(key, "****")
        return REGISTRY.scrub(text)

    def unsupported(self, feature: str, param: str | None = None) -> GatewayError:
        return GatewayError(400, f"provider {self.name!r} ({self.cfg.type}) does not support {feature}",
                            code="unsupported_feature", param=param, provider=self.name)

    def upstream_error(self, status: int, body: bytes, headers: Any = None, message: str | None = None,
                       etype: str | None = None) -> GatewayError:
        """Map an upstream HTTP error to a GatewayError with a sensible status for our client.

        Request errors (400/404/413/422) keep their status and are not retried elsewhere; rate limits
        (429) and overload (503/529) and other 5xx are retryable and reported as such."""
        if message is None:
            message, etype = extract_error(body)
        message = self.scrub(message or f"HTTP {status}")
        retry_after = parse_retry_after(headers.get("retry-after") if headers is not None else None)
        prefix = f"provider {self.name!r}: "
        if status == 429:
            return GatewayError(429, prefix + message, type="rate_limit_error", code="upstream_rate_limited",
                                provider=self.name, retryable=True, retry_after=retry_after, kind="rate_limited")
        if status in (503, 529):
            return GatewayError(503, prefix + message, type="service_unavailable", code="upstream_overloaded",
                                provider=self.name, retryable=True, retry_after=retry_after, kind="overloaded")
        if status in (408, 504):
            return GatewayError(504, prefix + message, type="timeout_error", code="upstream_timeout",
                                provider=self.name, retryable=True, kind="timeout")
        if status >= 500:
            return GatewayError(502, prefix + message, type="upstream_error", code="upstream_error",
                                provider=self.name, retryable=True, kind="upstream_5xx")
        if status in (401, 403):
            # The gateway's own upstream credentials were refused: not the client's fault.
            return GatewayError(502, prefix + "upstream rejected the gateway's credentials: " + message,
                                type="upstream_error", code="upstream_auth_error", provider=self.name,
                                retryable=True, kind="upstream_auth")
        if status == 404:
            return GatewayError(404, prefix + message, type=etype or "not_found_error", code="model_not_found",
                                provider=self.name, kind="upstream_4xx")
        if status == 413:
            return GatewayError(413, prefix + message, code="request_too_large", provider=self.name,
                                kind="upstream_4xx")
        return GatewayError(400 if status not in (409, 422) else status, prefix + message,
                            type=etype or "invalid_request_error", code="upstream_invalid_request",
                            provider=self.name, kind="upstream_4xx")


class MappedProvider(Provider):
    """An adapter with its own mapping step (``prepare``) and upstream exchange (``send``): the one-call
    operations are both steps.  ``send`` handles "chat" and "stream" (and "embed" where the vendor has it)."""

    async def chat(self, req: ChatRequest) -> ChatResponse:
        res: ChatResponse = await self.send(req, "chat", self.prepare(req, "chat"))
        return res

    async def stream(self, req: ChatRequest) -> AsyncIterator[dict[str, Any]]:
        res: AsyncIterator[dict[str, Any]] = await self.send(req, "stream", self.prepare(req, "stream"))
        return res


def extract_error(body: bytes) -> tuple[str | None, str | None]:
    """Pull (message, type) out of an OpenAI-, Anthropic- or Google-shaped error body."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        text = body.decode("utf-8", "replace").strip()
        return (text[:500] or None), None
    if isinstance(data, list) and data:
        data = data[0]
    if isinstance(data, dict):
        err = data.get("error", data)
        if isinstance(err, dict):
            return (str(err.get("message") or err.get("status") or "")[:2000] or None,
                    err.get("type") or err.get("status"))
        if isinstance(err, str):
            return err[:2000], None
    return None, None


def parse_retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        from email.utils import parsedate_to_datetime
        import time
        try:
            return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return None


# -- canonical content parts, as every vendor mapping reads them -----------------------------------------
def image_url_of(part: dict[str, Any], where: str) -> str:
    """The URL of a canonical ``image_url`` part (a 400 naming ``where`` when it is missing)."""
    iu = part.get("image_url")
    url = iu.get("url") if isinstance(iu, dict) else iu
    if not isinstance(url, str) or not url:
        raise bad_request(f"'{where}.image_url.url' must be a non-empty string", param=where, code="invalid_value")
    return url


def split_image_data_url(url: str, where: str) -> tuple[str, str]:
    """``data:<media type>;base64,<data>`` -> (media type, base64 data), or a 400 naming ``where``."""
    head, sep, data = url[5:].partition(",")
    media, _, enc = head.partition(";")
    if not sep or enc != "base64" or not media:
        raise bad_request(f"'{where}': image data URLs must be 'data:<media type>;base64,<data>'",
                          param=where, code="invalid_value")
    return media, data
