"""Authentication and roles.

``Authenticator.identify`` turns the presented key (``Authorization: Bearer`` or ``x-api-key``) into an
:class:`~helixagent.pipeline.Identity`; ``authorize`` also checks that the identity's role may perform
the action.  The master key (``HELIXAGENT_API_KEY`` / ``auth.master_key``) has the admin role.  With no
master key configured the gateway serves only on localhost and every local caller is admin.
"""
from __future__ import annotations

import hmac
from typing import Any

from ..errors import GatewayError
from ..pipeline import ANONYMOUS_LOCAL, Identity, RequestContext, Stage

# action -> roles allowed
PERMISSIONS: dict[str, frozenset[str]] = {
    "completions": frozenset({"admin", "user"}),
    "embeddings": frozenset({"admin", "user"}),
    "models": frozenset({"admin", "user", "readonly"}),
    "health": frozenset({"admin", "user", "readonly"}),
    "usage": frozenset({"admin", "user", "readonly"}),
    "admin": frozenset({"admin"}),
    "metrics": frozenset({"admin"}),
}

MASTER = Identity(key_id="master", user_id=None, application=None, role="admin", is_master=True)


class Authenticator:
    def __init__(self, master_key: str | None):
        self.master_key = master_key.encode() if master_key else None

    @property
    def open(self) -> bool:
        """No master key: local-only mode, no authentication."""
        return self.master_key is None

    async def identify(self, token: str | None) -> Identity:
        if self.master_key is None:
            return ANONYMOUS_LOCAL
        if not token:
            raise GatewayError(401, "missing API key: send 'Authorization: Bearer <key>' or 'x-api-key: <key>'",
                               type="authentication_error", code="missing_api_key")
        if hmac.compare_digest(token.encode(), self.master_key):
            return MASTER
        raise GatewayError(401, "invalid API key", type="authentication_error", code="invalid_api_key")

    async def authorize(self, token: str | None, action: str) -> Identity:
        ident = await self.identify(token)
        allowed = PERMISSIONS.get(action, PERMISSIONS["admin"])
        if ident.role not in allowed:
            raise GatewayError(403, f"the role {ident.role!r} may not use {action}; needs one of "
                                    f"{', '.join(sorted(allowed))}", type="permission_error",
                               code="insufficient_permissions")
        return ident


def bearer_of(headers: dict[str, str]) -> str | None:
    auth = headers.get("authorization")
    if auth:
        scheme, _, token = auth.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    key = headers.get("x-api-key")
    return key.strip() if key else None


class AuthStage(Stage):
    name = "auth"

    def __init__(self, auth: Authenticator):
        self.auth = auth

    async def pre(self, ctx: RequestContext) -> bool:
        action = "embeddings" if ctx.endpoint == "embeddings" else "completions"
        ctx.identity = await self.auth.authorize(bearer_of(ctx.headers), action)
        return False


def install(gw: Any) -> None:
    auth = Authenticator(gw.cfg.auth.master_key)
    gw.services["auth"] = auth
    gw.add_stage(AuthStage(auth))
