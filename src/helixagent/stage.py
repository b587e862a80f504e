"""The pipeline's stage base class (:mod:`helixagent.pipeline` re-exports it as ``Stage``).

In a module of its own because the pipeline is compiled (``helixagent.compiled``) and a compiled class
refuses subclasses defined in interpreted code: the stages of the routes, the records and the tests
subclass this one.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .pipeline import RequestContext


class Stage:
    """One step of the pipeline.  Override what you need."""

    name = "stage"
    # Outer stages (logging, metrics, recording) also see requests rejected before the pipeline ran,
    # such as a body that does not parse.
    outer = False

    async def pre(self, ctx: RequestContext) -> bool:
        """Return True to short-circuit (ctx.response or ctx.stream set).  Raise GatewayError to reject."""
        return False

    async def post(self, ctx: RequestContext) -> None:
        """Runs after the outcome is final (stream ended), in reverse order of entry."""
