"""Ensemble completions: one request answered by a panel of providers whose answers are combined (majority,
confidence- or quality-weighted vote, a judge, a debate).  See docs/ensemble.md.

Modules: ``spec`` (the panel a request asks for, resolved against the configured providers), ``panel``
(member calls through the router, the panel's timeout and partial panels, member records), ``strategies``
(normalisation and the votes), ``judge`` and ``debate``, ``budget`` (the worst-case reservation), ``stream``
(the combined answer as chunks), ``service`` (the endpoint, ``ensemble/<name>`` models, metrics)."""
