"""OpenAI's error shape: `{"error": {"message", "type", "param", "code"}}`, the exception that
carries it, and pydantic errors as one readable sentence without pydantic's internals."""

from __future__ import annotations

import re
from typing import Any

from pydantic import ValidationError

# OpenAI's error `type` for each status this stack returns.
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
    504: "timeout_error",
}


def error_body(
    status: int, message: str, *, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """OpenAI's error shape: ``{"error": {"message", "type", "param", "code"}}``."""
    kind = ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


# Union branches and validators appear in pydantic's error locations as type tags, not fields.
_TYPE_TAG = re.compile(  # `function` alone is a field name (a tool's), `function-after[...]` a tag
    r"^((str|int|float|bool|bytes|none|list|dict|tuple|set|literal|constrained|lax|json"
    r"|is-instance|tagged-union|nullable|chain|default|union)([-\[].*)?|function[-\[].*)$"
)


# What pydantic adds to its messages for developers: documentation links and error-type tags.
_PYDANTIC_DETAIL = re.compile(
    r"\s*(For further information visit \S+|\[type=\w+(,.*?input_type=[\w.]+)?\]"
    r"|https?://errors\.pydantic\.dev\S*)"
)
MAX_MESSAGE_CHARS = 1000


def public_message(text: str) -> str:
    """`text` fit for a client: one line, without pydantic's links and type tags, bounded."""
    text = " ".join(_PYDANTIC_DETAIL.sub("", text).split())
    return text if len(text) <= MAX_MESSAGE_CHARS else text[: MAX_MESSAGE_CHARS - 3] + "..."


def validation_message(errors: list[dict[str, Any]] | ValidationError) -> tuple[str, str | None]:
    """One readable sentence for pydantic errors, and the offending parameter's name."""
    if isinstance(errors, ValidationError):
        errors = errors.errors(include_url=False)
    if not errors:
        return "invalid request", None
    first = errors[0]
    if first.get("type") == "json_invalid":
        return "request body is not valid JSON", None
    loc = [str(p) for p in first.get("loc", ()) if p != "body" and not _TYPE_TAG.match(str(p))]
    param = ".".join(loc) or None
    message = public_message(str(first.get("msg", "invalid value")).removeprefix("Value error, "))
    if first.get("type") == "missing":
        message = f"missing required parameter '{param}'"
    elif param:
        message = f"invalid parameter '{param}': {message}"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return message, param


class OpenAIError(Exception):
    """An error answered as ``{"error": {...}}`` with an HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    @classmethod
    def from_body(cls, status: int, body: dict[str, Any]) -> OpenAIError:
        error = body.get("error", {})
        return cls(
            status, error.get("message", ""), param=error.get("param"), code=error.get("code")
        )

    @classmethod
    def unreachable(cls, what: str, code: str) -> OpenAIError:
        """503 with `Retry-After: 1`: one of the stack's own actors (`what`) did not answer."""
        message = f"the {what} cannot be reached; retry later"
        return cls(503, message, code=code, headers={"retry-after": "1"})

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, param=self.param, code=self.code)

    def __reduce__(self) -> tuple[Any, ...]:  # keep keyword fields across Ray's pickling
        return (_rebuild, (self.status, self.message, self.param, self.code, self.headers))


def _rebuild(
    status: int, message: str, param: str | None, code: str | None, headers: dict[str, str]
) -> OpenAIError:
    return OpenAIError(status, message, param=param, code=code, headers=headers)
