"""Response cache and de-duplication."""
