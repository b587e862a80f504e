"""Mapping a request onto a candidate (the prepared request, its vendor wire request, what was adapted)
and ``_Mapped``, the fallback-adaptation rule for one request's candidates."""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from ..canonical import EmbeddingRequest
from ..errors import GatewayError
from ..pipeline import RequestContext
from ..providers import Provider
from . import adapt
from .plan import Candidate

if TYPE_CHECKING:
    from .router import Router

log = logging.getLogger("helixagent.routing")

_NONE: list[Any] = []  # a shared empty list (never appended to)


def prepare(self: Router, c: Candidate, req: Any, op: str) -> tuple[Any, Any, list[str]]:
    """The candidate's request, its vendor wire request and what was adapted (the mapping step; no
    upstream call, no verdict on the provider).  Input the mapping rejects is a 400, never retried nor
    counted (with ``drop_params`` on, refused parameters are first clamped or dropped: adapt.py); any
    other exception here is a gateway bug: a loud 500, never the provider's fault."""
    sub = req
    if req.model != c.model:
        sub = req.copy_for(c.model) if op != "embed" else EmbeddingRequest(c.model, req.input, req.params,
                                                                           req.provider)
    p = c.provider
    dropped: list[str] = _NONE
    try:
        if op == "embed" and type(p).embed is Provider.embed:  # no embeddings: refused before any call
            raise p.unsupported("embeddings", "model")
        if op != "embed":
            refused = sub.refusal_for(p)
            if refused is not None:
                raise refused
        steps = 0
        while True:
            try:
                wire = p.prepare(sub, op)
                break
            except GatewayError as exc:
                a = None
                if c.drop_params and op != "embed" and exc.code == adapt.UNSUPPORTED and steps < adapt.MAX_STEPS:
                    a = adapt.adapt(sub, exc.param, p.cfg.type)
                if a is None:
                    raise
                sub, item = a
                dropped = [*dropped, item]
                steps += 1
        if c.drop_params and op != "embed":
            ign = adapt.ignored(sub, p.cfg.type)
            if ign:
                dropped = [*dropped, *ign]
        return sub, wire, dropped
    except GatewayError as exc:
        exc.retryable = False
        if exc.provider is None:
            exc.provider = c.name
        raise
    except Exception:
        log.exception("mapping the request for provider %s (%s) failed: a gateway bug", c.name,
                      c.provider.cfg.type)
        raise GatewayError(500, f"internal error while preparing the request for provider {c.name!r}",
                           type="server_error", code="internal_error", kind="internal") from None


class _Mapped:
    """One request's mapping onto its candidates: each candidate's prepared request (mapped once), the
    candidates skipped because they cannot serve the request as asked, and the adaptations made.

    The rule (docs/routing.md, "Requests a provider cannot serve as asked"): the request is judged
    against the *primary* candidates -- the model the client named -- whatever their health: malformed
    input is a 400 at once, and a request none of them can serve as asked is the first one's 400
    (``unsupported_feature``), never sent anywhere.  Any other candidate whose mapping refuses it is
    skipped, and named in the error when no candidate answers; the error is then the failure of those
    that were tried (5xx/429 with its Retry-After), never a fallback's 400."""

    __slots__ = ("router", "req", "op", "done", "skipped", "primary", "named_ids")

    def __init__(self, router: Router, req: Any, op: str):
        self.router = router
        self.req = req
        self.op = op
        self.done: dict[Candidate, tuple[Any, Any, list[str]] | GatewayError] = {}
        self.skipped: list[tuple[Candidate, GatewayError]] = _NONE  # allocated on the first skip
        self.primary: list[Candidate] = _NONE
        self.named_ids: set[int] | None = None

    def get(self, c: Candidate) -> tuple[Any, Any, list[str]]:
        """(request, wire request, adaptations) for ``c``, or its mapping's GatewayError."""
        hit = self.done.get(c)
        if hit is None:
            try:
                hit = self.router._prepare(c, self.req, self.op)
            except GatewayError as exc:
                hit = exc
            self.done[c] = hit
        if isinstance(hit, GatewayError):
            raise hit
        return hit

    def check(self, ctx: RequestContext, primary: list[Candidate]) -> None:
        """Raise the 400 for a request no primary candidate can serve as asked (or malformed input)."""
        self.primary = primary
        first: GatewayError | None = None
        for c in primary:
            try:
                self.get(c)
                return
            except GatewayError as exc:
                if exc.code != adapt.UNSUPPORTED:
                    ctx.provider = ctx.provider or c.name
                    raise
                if first is None:
                    first = exc
        if first is not None:
            ctx.provider = ctx.provider or first.provider
            raise first

    def skip(self, c: Candidate, exc: GatewayError) -> None:
        """``c``'s mapping refused the request: skip it (a gateway bug, a 5xx, is raised)."""
        if exc.status >= 500:
            raise exc
        if self.skipped is _NONE:
            self.skipped = []
        if all(x is not c for x, _ in self.skipped):
            self.skipped.append((c, exc))
            log.info("provider %s skipped: cannot serve the request as asked (%s)", c.name, exc.code)

    def unskipped(self, cands: list[Candidate]) -> list[Candidate]:
        """The candidates not skipped (those the breakers left out included): the unavailable ones."""
        sk = [x for x, _ in self.skipped]
        out: list[Candidate] = []
        for c in (*self.primary, *cands):
            if all(c is not x for x in sk) and all(c is not x for x in out):
                out.append(c)
        return out or cands

    def named(self, err: GatewayError) -> GatewayError:
        """``err`` naming the candidates skipped because they cannot serve the request as asked."""
        if not self.skipped:
            return err
        if self.named_ids is None:
            self.named_ids = set()
        if id(err) not in self.named_ids:
            self.named_ids.add(id(err))
            err.message += (" [skipped, cannot serve this request as asked: "
                            + "; ".join(f"{c.name}: {e.message}" + (f" (param {e.param!r})" if e.param else "")
                                        for c, e in self.skipped) + "]")
            err.args = (err.message,)
        return err

    def served_by(self, ctx: RequestContext, c: Candidate) -> None:
        """Name what was adapted for the candidate that answered (header, record state)."""
        hit = self.done.get(c)
        if isinstance(hit, tuple) and hit[2]:
            adapt.add_dropped(ctx.response_headers, hit[2])
            ctx.state["dropped_params"] = hit[2]
