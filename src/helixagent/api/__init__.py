"""HTTP surface and client formats."""
