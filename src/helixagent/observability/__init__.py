"""Metrics, logs, tracing."""
