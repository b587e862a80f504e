"""Gateway errors: one exception type, rendered in each client format's own error shape."""
from __future__ import annotations

from typing import Any

# OpenAI error `type` per status, used when nothing more specific is known.
_OPENAI_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
    404: "not_found_error", 405: "invalid_request_error", 408: "timeout_error",
    409: "conflict_error", 413: "invalid_request_error", 415: "invalid_request_error",
    422: "invalid_request_error", 429: "rate_limit_error", 500: "server_error",
    502: "upstream_error", 503: "service_unavailable", 504: "timeout_error",
}
# Anthropic error `type` per status (https://docs.anthropic.com/en/api/errors).
_ANTHROPIC_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
    404: "not_found_error", 405: "invalid_request_error", 413: "request_too_large",
    422: "invalid_request_error", 429: "rate_limit_error", 500: "api_error",
    502: "api_error", 503: "overloaded_error", 504: "api_error", 529: "overloaded_error",
}


class GatewayError(Exception):
    """An error answered to the client.

    ``retryable`` says whether routing may try another attempt/provider (timeouts, 429, 5xx,
    connection errors); request errors (4xx caused by the request itself) are not retryable.
    """

    def __init__(self, status: int, message: str, *, type: str | None = None, code: str | None = None,
                 param: str | None = None, provider: str | None = None, retryable: bool = False,
                 retry_after: float | None = None, headers: dict[str, str] | None = None,
                 kind: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.provider = provider
        self.retryable = retryable
        self.retry_after = retry_after
        self.headers = headers or {}
        # short machine name for records/metrics: timeout, rate_limited, upstream_5xx, connection, ...
        self.kind = kind or (code or self.openai_type())

    def clone(self) -> "GatewayError":
        """A private copy of a shared error, of the same class (each task that raises it gets its own: one
        instance raised in many tasks would chain their tracebacks)."""
        c = type(self).__new__(type(self))
        c.__dict__.update(self.__dict__)
        c.args = self.args
        c.headers = dict(self.headers)
        return c

    def openai_type(self) -> str:
        return self.type or _OPENAI_TYPES.get(self.status,
                                              "server_error" if self.status >= 500 else "invalid_request_error")

    def openai_body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.openai_type(), "param": self.param,
                          "code": self.code}}

    def anthropic_body(self) -> dict[str, Any]:
        t = _ANTHROPIC_TYPES.get(self.status, "api_error" if self.status >= 500 else "invalid_request_error")
        if self.type is not None and self.type in _ANTHROPIC_TYPES.values():
            t = self.type
        return {"type": "error", "error": {"type": t, "message": self.message}}

    def response_headers(self) -> dict[str, str]:
        h = dict(self.headers)
        if self.retry_after is not None and "retry-after" not in h:
            h["retry-after"] = str(max(1, int(round(self.retry_after + 0.499))))
        if self.provider:
            h.setdefault("x-helixagent-provider", self.provider)
        return h

    def __repr__(self) -> str:
        return f"GatewayError({self.status}, {self.message!r}, provider={self.provider!r})"


def bad_request(message: str, param: str | None = None, code: str | None = None) -> GatewayError:
    return GatewayError(400, message, param=param, code=code or "invalid_request")


def not_found(message: str, code: str = "not_found", param: str | None = None) -> GatewayError:
    return GatewayError(404, message, code=code, param=param)
