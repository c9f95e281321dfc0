"""OpenAI-shaped errors: one exception type, and handlers so nothing else reaches a client."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.wire import error_body, validation_message

logger = logging.getLogger("vrstack.ingress")


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

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, param=self.param, code=self.code)

    def __reduce__(self) -> tuple[Any, ...]:  # keep keyword fields across Ray's pickling
        return (_rebuild, (self.status, self.message, self.param, self.code, self.headers))


def _rebuild(
    status: int, message: str, param: str | None, code: str | None, headers: dict[str, str]
) -> OpenAIError:
    return OpenAIError(status, message, param=param, code=code, headers=headers)


def error_response(exc: OpenAIError, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(
        exc.body(), status_code=exc.status, headers={**exc.headers, **(headers or {})}
    )


_HTTP_MESSAGES = {
    404: (
        "no route {method} {path}; see GET /v1/models and POST /v1/chat/completions",
        "not_found",
    ),
    405: ("method {method} is not allowed on {path}", "method_not_allowed"),
}


def install_error_handlers(app: FastAPI) -> None:
    """Answer every failure in OpenAI's shape; never a stack trace or an exception name."""

    @app.exception_handler(OpenAIError)
    async def _openai(_: Request, exc: OpenAIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = validation_message(list(exc.errors()))
        return error_response(OpenAIError(400, message, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        template, code = _HTTP_MESSAGES.get(exc.status_code, (str(exc.detail), None))
        message = template.format(method=request.method, path=request.url.path)
        return error_response(OpenAIError(exc.status_code, message, code=code), exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        request_id = request.headers.get("x-request-id", "-")
        logger.exception("unhandled error in request %s", request_id)
        return error_response(
            OpenAIError(500, f"internal error; quote request id {request_id} when reporting it")
        )
