"""Rate limits and budgets (the ``rate_limits:`` block, plus per-key overrides).

The :class:`LimitsStage` runs after authentication and before the cache.  For each request it builds the
list of applicable limits -- per IP, per API key, per user, per application, in requests, tokens and
dollars -- and reserves against all of them in one atomic check-and-consume (one Lua call with Redis):

* requests count 1;
* tokens count an estimate made before the upstream call: the prompt counted locally
  (:func:`helixagent.tokens.estimate_messages`) plus ``max_tokens`` (or ``default_completion_tokens``)
  for each of the ``n`` choices;
* dollars count that estimate priced at the dearest candidate provider's price for the model.

After the answer, :meth:`LimitsStage.post` settles each token and dollar reservation to the real usage
(refunding the difference or charging an overshoot); a cache hit costs no upstream tokens.  Because a
reservation is taken before the upstream call, concurrent requests cannot overshoot a budget.

The logic lives in named modules: :mod:`.limiter` (limits, plans, estimates, prices and budgets) and
:mod:`.stage` (the pipeline stage, its headers and errors, and :func:`install`); the counting backends are
in :mod:`.backends`.  This package re-exports their public names.
"""
from __future__ import annotations

from .limiter import (BUDGET_ACTIVE_SECONDS, BUDGET_MAX_TRACKED, BUDGET_REFRESH_SECONDS, EMPTY, MICRO, REQ, TOK,
                      USD, Limit, Limiter, Plan, configured_budgets, make_backend)
from .stage import LimitsStage, fmt_reset, install

__all__ = ["BUDGET_ACTIVE_SECONDS", "BUDGET_MAX_TRACKED", "BUDGET_REFRESH_SECONDS", "EMPTY", "MICRO", "REQ",
           "TOK", "USD", "Limit", "Limiter", "LimitsStage", "Plan", "configured_budgets", "fmt_reset",
           "install", "make_backend"]
