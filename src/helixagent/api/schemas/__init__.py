"""Declared request schemas, one per client format, checked once at the edge (see ``base.py``)."""
