"""The section models of the configuration, one module per concern; ``helixagent.config`` composes
them into ``Config`` and re-exports every name (import from there)."""
