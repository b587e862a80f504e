"""Routing: candidate selection, fallback chains, failure handling."""
