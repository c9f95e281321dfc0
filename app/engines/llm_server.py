"""The engine deployment: Ray Serve LLM's `LLMServer` with a plain-data entry point.

The ingress never imports vLLM. It sends `(endpoint, body)` with the body as a JSON dict and gets
back plain items, so nothing vLLM-specific crosses the process boundary:

- ``{"body": dict}``: a whole JSON response (non-streaming endpoints),
- ``{"sse": str}``: one or more ``data: ...`` server-sent-event lines of a stream,
- ``{"error": dict, "status": int}``: an OpenAI-shaped error from the engine.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator
from typing import Any

from pydantic import BaseModel, ValidationError
from ray.serve.llm import LLMServer

from app.engines import embedded
from app.engines.items import Endpoint, EngineItem, error_item
from app.engines.stat_logger import EngineStats
from app.errors import validation_message
from app.ray_internals import (
    NoTelemetryStart,
    add_stat_logger,
    enable_tokenization,
    openai_request_models,
)

logger = logging.getLogger("vrstack.engine")


def _request_class(endpoint: Endpoint, body: dict[str, Any]) -> type[BaseModel]:
    oai = openai_request_models()
    chat_shaped = "messages" in body
    return {
        "completions": oai.CompletionRequest,
        "chat": oai.ChatCompletionRequest,
        "embeddings": oai.EmbeddingChatRequest if chat_shaped else oai.EmbeddingCompletionRequest,
        "tokenize": oai.TokenizeChatRequest if chat_shaped else oai.TokenizeCompletionRequest,
        "detokenize": oai.DetokenizeRequest,
    }[endpoint]


class EngineServer(NoTelemetryStart, LLMServer):
    """An `LLMServer` replica (one vLLM engine) that speaks plain dicts to the ingress."""

    async def __init__(
        self, llm_config: Any, *, embedded_model: str | None = None, **kwargs: Any
    ) -> None:
        self._in_flight = 0
        self._engine_stats = EngineStats()
        if embedded_model:  # convert on this node, once; the engine then loads the folder
            await asyncio.to_thread(embedded.prepare, embedded_model)
        await super().__init__(llm_config, **kwargs)

    async def record_routing_stats(self) -> dict[str, Any]:
        """Stats for `StackRequestRouter` and the ingress's metrics: requests in this replica
        (from every ingress), and the engine's running/queued requests, KV-cache usage and
        prefix-cache hits (`app.engines.stat_logger`)."""
        return {
            **await super().record_routing_stats(),
            "in_flight": self._in_flight,
            **self._engine_stats.as_dict(),
        }

    async def start(self) -> None:
        await super().start()
        enable_tokenization(self.engine)
        if not add_stat_logger(self.engine, self._engine_stats):
            logger.warning("vLLM engine has no stat loggers; engine state metrics stay at 0")

    async def serve_openai(
        self, endpoint: Endpoint, body: dict[str, Any], *, route: dict | None = None
    ) -> AsyncGenerator[EngineItem, None]:
        """Run one OpenAI request; yields plain items (see the module docstring).

        `route` is filled by the request router in the caller's process; unused here."""
        try:
            request = _request_class(endpoint, body).model_validate(body)
        except ValidationError as exc:
            message, param = validation_message(exc)
            yield error_item(400, message, param=param)
            return
        except ValueError as exc:
            yield error_item(400, str(exc))
            return
        self._in_flight += 1
        try:
            async for item in await getattr(self, endpoint)(request):
                for plain in _plain_items(item):
                    yield plain
        finally:
            self._in_flight -= 1


def _plain_items(item: Any) -> list[EngineItem]:
    """`LLMServer` streams lists of SSE strings gathered every 50 ms: each list stays one item
    (one Ray stream message per batch, not per token); anything else becomes one item each."""
    chunks = item if isinstance(item, list) else [item]
    if chunks and all(isinstance(chunk, str) for chunk in chunks):
        return [{"sse": "".join(chunks)}]
    return [_plain(chunk) for chunk in chunks]


def _plain(item: Any) -> EngineItem:
    if isinstance(item, str):
        return {"sse": item}
    data = item.model_dump(mode="json", exclude_none=False)
    if "error" in data and len(data) == 1:
        error = data["error"]
        code = error.get("code")
        status = code if isinstance(code, int) and 400 <= code < 600 else 500
        return error_item(status, error.get("message") or "engine error", param=error.get("param"))
    return {"body": data}
