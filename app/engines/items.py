"""What an engine replica answers a handle call with: plain items, never vLLM objects.

- ``{"body": dict}``: a whole JSON response (non-streaming endpoints),
- ``{"chunk": dict}``: one chunk of a stream,
- ``{"error": dict, "status": int}``: an OpenAI-shaped error.
(HTTP requests get the same answers as JSON or server-sent events: `app.engines.http_server`.)
"""

from __future__ import annotations

from typing import Any, Literal

from app.errors import error_body

Endpoint = Literal["completions", "chat", "embeddings", "score", "rerank", "tokenize", "detokenize"]
EngineItem = dict[str, Any]


def error_item(
    status: int, message: str, *, param: str | None = None, code: str | None = None
) -> EngineItem:
    return {"status": status, **error_body(status, message, param=param, code=code)}
