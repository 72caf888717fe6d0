"""OpenAI-shaped API errors: one exception type the ingress turns into a JSON error response."""

from __future__ import annotations

import math


class APIError(Exception):
    """An error to return to an OpenAI client as `{"error": {message, type, param, code}}`.

    `status` is the HTTP status; `param` names the offending request field (`messages[0].content`)
    so clients can point at it; `retry_after` (seconds) becomes a `Retry-After` header on 429/503.
    """

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.retry_after = retry_after

    def __reduce__(self):
        """Pickle with every field, so handle callers in other processes get the same error."""
        return (APIError, (self.status, self.message, self.type, self.param, self.code,
                           self.retry_after))

    def to_dict(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def headers(self) -> dict[str, str]:
        """HTTP headers that go with this error (only `Retry-After`, when known)."""
        if self.retry_after is None:
            return {}
        return {"Retry-After": str(max(1, math.ceil(self.retry_after)))}

    def __repr__(self) -> str:
        return f"APIError({self.status}, {self.message!r}, param={self.param!r})"

    @classmethod
    def bad_request(cls, message: str, param: str | None = None,
                    code: str | None = None) -> APIError:
        return cls(400, message, "invalid_request_error", param, code)

    @classmethod
    def unauthorized(cls, message: str = "Invalid or missing API key.") -> APIError:
        return cls(401, message, "authentication_error", None, "invalid_api_key")

    @classmethod
    def not_found(cls, message: str, param: str | None = None,
                  code: str | None = None) -> APIError:
        return cls(404, message, "not_found_error", param, code)

    @classmethod
    def model_not_found(cls, model: str) -> APIError:
        return cls.not_found(f"The model `{model}` does not exist.", "model", "model_not_found")

    @classmethod
    def too_large(cls, message: str) -> APIError:
        return cls(413, message, "invalid_request_error", None, "request_too_large")

    @classmethod
    def rate_limited(cls, message: str, retry_after: float | None = None) -> APIError:
        return cls(429, message, "rate_limit_error", None, "rate_limit_exceeded", retry_after)

    @classmethod
    def server_error(cls, message: str = "The server had an error while processing the request."
                     ) -> APIError:
        return cls(500, message, "server_error")

    @classmethod
    def overloaded(cls, retry_after: float | None = None,
                   message: str = "The server is overloaded; retry later.") -> APIError:
        return cls(503, message, "service_unavailable", None, "overloaded", retry_after)
