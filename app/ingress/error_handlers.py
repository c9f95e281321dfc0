"""The ingress's error handlers: every failure answered in OpenAI's shape, nothing else reaches a
client."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.errors import OpenAIError, validation_message

logger = logging.getLogger("vrstack.ingress")


def error_response(exc: OpenAIError, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(
        exc.body(), status_code=exc.status, headers={**exc.headers, **(headers or {})}
    )


_LOCATIONS = ("body", "query", "path", "header", "cookie")


def _field(loc: tuple) -> tuple:
    """FastAPI's error location without where in the request it is (`query.limit`: `limit`)."""
    return tuple(loc[1:]) if loc and loc[0] in _LOCATIONS else tuple(loc)


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
        errors = [{**e, "loc": _field(e.get("loc", ()))} for e in exc.errors()]
        message, param = validation_message(errors)
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
