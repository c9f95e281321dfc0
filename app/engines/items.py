"""What an engine replica answers the ingress with: plain items, never vLLM objects.

- ``{"body": dict}``: a whole JSON response (non-streaming endpoints),
- ``{"sse": str}``: one or more ``data: ...`` server-sent-event lines of a stream,
- ``{"error": dict, "status": int}``: an OpenAI-shaped error from the engine.
"""

from __future__ import annotations

from typing import Any, Literal

from app.errors import error_body

Endpoint = Literal["completions", "chat", "embeddings", "tokenize", "detokenize"]
EngineItem = dict[str, Any]


def error_item(
    status: int, message: str, *, param: str | None = None, code: str | None = None
) -> EngineItem:
    return {"status": status, **error_body(status, message, param=param, code=code)}
