"""Routing: which providers may serve a request, in which order, and failing over between them."""
from __future__ import annotations

import logging
import time
from typing import Any, AsyncIterator

from ..canonical import ChatRequest, EmbeddingRequest
from ..config import Config
from ..errors import GatewayError, not_found
from ..pipeline import RequestContext
from ..providers import Provider

log = logging.getLogger("helixagent.routing")


class Candidate:
    __slots__ = ("provider", "model")

    def __init__(self, provider: Provider, model: str):
        self.provider = provider
        self.model = model

    def __repr__(self) -> str:
        return f"Candidate({self.provider.name}, {self.model})"


class Router:
    def __init__(self, cfg: Config, providers: dict[str, Provider]):
        self.cfg = cfg
        self.providers = providers
        self.ordered = sorted((p for p in providers.values() if p.cfg.enabled), key=lambda p: p.cfg.priority)
        self._cache: dict[tuple[str | None, str], list[Candidate]] = {}

    # -- candidate selection -----------------------------------------------------------------------
    def default_model(self, p: Provider) -> str:
        ms = p.models()
        if not ms:
            raise GatewayError(400, f"provider {p.name!r} has no models configured; name a model", param="model",
                               code="model_required")
        return ms[0]

    def candidates(self, model: str, pinned: str | None) -> list[Candidate]:
        key = (pinned, model)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        out = self._select(model, pinned)
        if len(self._cache) < 4096:
            self._cache[key] = out
        return out

    def _select(self, model: str, pinned: str | None) -> list[Candidate]:
        primary: list[Candidate] = []
        if pinned is not None:
            p = self.providers.get(pinned)
            if p is None or not p.cfg.enabled:
                raise not_found(f"provider {pinned!r} is not configured "
                                f"(configured: {', '.join(self.providers) or 'none'})",
                                code="provider_not_found", param="provider")
            primary.append(Candidate(p, model or self.default_model(p)))
        else:
            aliases = self.cfg.routing.aliases.get(model)
            if aliases:
                for t in aliases:
                    p = self.providers.get(t.provider)
                    if p is not None and p.cfg.enabled:
                        primary.append(Candidate(p, t.model))
                primary.sort(key=lambda c: c.provider.cfg.priority)
            elif not model:
                if not self.ordered:
                    raise not_found("no providers are configured", code="provider_not_found")
                p = self.ordered[0]
                primary.append(Candidate(p, self.default_model(p)))
            else:
                primary = [Candidate(p, model) for p in self.ordered if p.serves(model)]
            if not primary:
                raise not_found(f"the model {model!r} does not exist or is not served by any configured provider",
                                code="model_not_found", param="model")
        # Append fallback chains (breadth-first, no repeats).
        seen = {c.provider.name for c in primary}
        out = list(primary)
        i = 0
        while i < len(out):
            for name in out[i].provider.cfg.fallback_to:
                if name in seen:
                    continue
                p = self.providers.get(name)
                if p is None or not p.cfg.enabled:
                    continue
                seen.add(name)
                m = out[i].model if p.serves(out[i].model) else (p.models()[0] if p.models() else None)
                if m:
                    out.append(Candidate(p, m))
            i += 1
        return out

    # -- execution ---------------------------------------------------------------------------------
    async def handle_chat(self, ctx: RequestContext) -> None:
        req: ChatRequest = ctx.request
        cands = self.candidates(req.model, req.provider)
        last: GatewayError | None = None
        for i, c in enumerate(cands):
            ctx.attempts += 1
            if i:
                ctx.fallbacks += 1
            ctx.candidates_tried.append(c.provider.name)
            ctx.provider = c.provider.name
            ctx.upstream_model = c.model
            sub = req if c.model == req.model else req.copy_for(c.model)
            t0 = time.perf_counter()
            try:
                if req.stream:
                    stream = await c.provider.stream(sub)
                    first = await _first(stream)
                    ctx.upstream_latency = time.perf_counter() - t0
                    ctx.stream = _prepend(first, stream)
                    ctx.streamed = True
                else:
                    ctx.response = await c.provider.chat(sub)
                    ctx.upstream_latency = time.perf_counter() - t0
                return
            except GatewayError as exc:
                last = exc
                if not exc.retryable:
                    raise
                log.warning("provider %s failed (%s); %s", c.provider.name, exc.kind,
                            "falling back" if i + 1 < len(cands) else "no fallback left")
        assert last is not None
        raise last

    async def handle_embeddings(self, ctx: RequestContext) -> None:
        req: EmbeddingRequest = ctx.request
        cands = self.candidates(req.model, req.provider)
        last: GatewayError | None = None
        for c in cands:
            ctx.attempts += 1
            ctx.provider = c.provider.name
            ctx.upstream_model = c.model
            req.model = c.model
            try:
                ctx.response = await c.provider.embed(req)
                return
            except GatewayError as exc:
                last = exc
                if not exc.retryable:
                    raise
        assert last is not None
        raise last


_END = object()


async def _first(stream: AsyncIterator[dict[str, Any]]) -> Any:
    try:
        return await stream.__anext__()
    except StopAsyncIteration:
        return _END


async def _prepend(first: Any, stream: AsyncIterator[dict[str, Any]]) -> AsyncIterator[dict[str, Any]]:
    try:
        if first is _END:
            return
        yield first
        async for chunk in stream:
            yield chunk
    finally:
        closer = getattr(stream, "aclose", None)
        if closer is not None:
            await closer()
