"""Authentication and roles.

``Authenticator.identify`` turns the presented key (``Authorization: Bearer`` or ``x-api-key``) into an
:class:`~helixagent.pipeline.Identity`; ``authorize`` also checks that the identity's role may perform
the action.  The master key (``HELIXAGENT_API_KEY`` / ``auth.master_key``) has the admin role; virtual
keys (``hx-...``, see :mod:`.keys`) carry their own role, owner and limits.  With no master key
configured the gateway serves only on localhost: a caller without a (known) virtual key is the local
admin, while a virtual key still authenticates as itself (so its role and limits apply).

Hot path: the SHA-256 of the presented key is looked up in an in-process dict; the database is read only
on a miss or after the entry's TTL (``auth.key_cache_ttl`` while the Redis key-change subscription is
live, at most 1 s otherwise).  Revocation on the same instance evicts at once; other instances hear it
over Redis and acknowledge before the revoke call returns (see :mod:`.bus`).

The logic lives in named modules: :mod:`.authenticator` (:class:`Authenticator`, the roles and the key
cache) and :mod:`.stage` (:class:`AuthStage`, :func:`bearer_of`, :func:`install`); the key store is
:mod:`.keys`.  This package re-exports their public names.
"""
from __future__ import annotations

from .authenticator import (FALLBACK_TTL, MASTER, NEGATIVE_MAX, NEGATIVE_TTL, PERMISSIONS, Authenticator,
                            invalid_key, revoked_key, store_unavailable)
from .stage import AuthStage, auth_redis_url, bearer_of, install

__all__ = ["FALLBACK_TTL", "MASTER", "NEGATIVE_MAX", "NEGATIVE_TTL", "PERMISSIONS", "AuthStage", "Authenticator",
           "auth_redis_url", "bearer_of", "install", "invalid_key", "revoked_key", "store_unavailable"]
