"""A batch's input file read into requests: OpenAI's JSONL, one request a line
(`{"custom_id", "method": "POST", "url", "body"}`), each body checked as the endpoint checks it
online, with its faults in OpenAI's batch error shape (`{code, message, param, line}`)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from pydantic import ValidationError

from app.engines.items import Endpoint
from app.errors import OpenAIError, validation_message
from app.ingress.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    OpenAIRequest,
    SamplingRequest,
)

ENDPOINTS: dict[str, Endpoint] = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "completions",
    "/v1/embeddings": "embeddings",
}
REQUESTS: dict[Endpoint, type[OpenAIRequest]] = {
    "chat": ChatCompletionRequest,
    "completions": CompletionRequest,
    "embeddings": EmbeddingRequest,
}
MAX_FAULTS = 100  # faults listed in a failed batch's `errors`
Check = Callable[[OpenAIRequest], None]  # raises OpenAIError for a request the caller may not make


def request_of(url: str, body: dict[str, Any]) -> OpenAIRequest:
    """The body as the endpoint's request model (ValidationError if it is not one)."""
    return REQUESTS[ENDPOINTS[url]].model_validate(body)


def read_requests(
    data: bytes, url: str, max_requests: int, check: Check
) -> tuple[list[tuple[str, dict[str, Any]]], list[dict[str, Any]]]:
    """The file's requests as (custom_id, body), each body after `check` (which may set
    server-side defaults on it), and the faults of its lines (at most `MAX_FAULTS`)."""
    requests: list[tuple[str, dict[str, Any]]] = []
    faults: list[dict[str, Any]] = []
    seen: set[str] = set()
    lines = [line for line in data.splitlines() if line.strip()]
    if not lines:
        return [], [_fault("empty_file", "the input file has no request", None, None)]
    if len(lines) > max_requests:
        message = f"the input file has {len(lines)} requests; a batch takes at most {max_requests}"
        return [], [_fault("too_many_requests", message, None, None)]
    for number, line in enumerate(lines, start=1):
        try:
            custom_id, body = _request(line, url, seen, check)
        except _Fault as fault:
            if len(faults) < MAX_FAULTS:
                faults.append(_fault(fault.code, fault.message, fault.param, number))
            continue
        seen.add(custom_id)
        requests.append((custom_id, body))
    return requests, faults


class _Fault(Exception):
    def __init__(self, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.param = code, message, param


def _request(line: bytes, url: str, seen: set[str], check: Check) -> tuple[str, dict[str, Any]]:
    try:
        item = json.loads(line)
    except ValueError:
        raise _Fault("invalid_json", "the line is not valid JSON") from None
    if not isinstance(item, dict):
        raise _Fault("invalid_request", "the line must be a JSON object")
    custom_id = item.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        raise _Fault("missing_required_parameter", "custom_id must be a non-empty string",
                     "custom_id")  # fmt: skip
    if custom_id in seen:
        raise _Fault("duplicate_custom_id", f"custom_id {custom_id!r} is used twice", "custom_id")
    if item.get("method") != "POST":
        raise _Fault("invalid_value", "method must be POST", "method")
    if item.get("url") != url:
        raise _Fault("mismatched_endpoint", f"url must be the batch's endpoint {url}", "url")
    body = item.get("body")
    if not isinstance(body, dict):
        raise _Fault("invalid_request", "body must be a JSON object", "body")
    try:
        request = request_of(url, body)
    except ValidationError as exc:
        message, param = validation_message(exc)
        raise _Fault("invalid_request", message, f"body.{param}" if param else "body") from None
    if isinstance(request, SamplingRequest) and request.stream:
        raise _Fault("invalid_value", "a batch request cannot stream", "body.stream")
    try:
        check(request)
    except OpenAIError as exc:
        param = f"body.{exc.param}" if exc.param else "body"
        raise _Fault(exc.code or "invalid_request", exc.message, param) from None
    return custom_id, request.engine_body(request.model)


def _fault(code: str, message: str, param: str | None, line: int | None) -> dict[str, Any]:
    return {"code": code, "message": message, "param": param, "line": line}
