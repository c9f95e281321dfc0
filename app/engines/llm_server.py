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
from app.engines.stat_logger import EngineStats, attach
from app.errors import validation_message

logger = logging.getLogger("vrstack.engine")


def _request_class(endpoint: Endpoint, body: dict[str, Any]) -> type[BaseModel]:
    from ray.llm._internal.serve.core.configs import openai_api_models as oai

    chat_shaped = "messages" in body
    return {
        "completions": oai.CompletionRequest,
        "chat": oai.ChatCompletionRequest,
        "embeddings": oai.EmbeddingChatRequest if chat_shaped else oai.EmbeddingCompletionRequest,
        "tokenize": oai.TokenizeChatRequest if chat_shaped else oai.TokenizeCompletionRequest,
        "detokenize": oai.DetokenizeRequest,
    }[endpoint]


class EngineServer(LLMServer):
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
        prefix-cache hits (`app.engines.stats`)."""
        return {
            **await super().record_routing_stats(),
            "in_flight": self._in_flight,
            **self._engine_stats.as_dict(),
        }

    async def _start_engine(self) -> None:
        """The engine start of `LLMServer`, minus its usage-telemetry push when Ray's usage
        stats are disabled (`ray start --disable-usage-stats`, as `vrstack up` starts Ray): that
        push creates a detached telemetry actor and waits for it, ~5 s of a 2-core start-up,
        for data that is never sent."""
        from ray._common.usage.usage_lib import usage_stats_enabled

        if usage_stats_enabled():
            await super()._start_engine()
        else:
            await self.engine.start()

    async def start(self) -> None:
        await super().start()
        _enable_tokenization(self.engine)
        if not attach(self.engine, self._engine_stats):
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


def _enable_tokenization(engine: Any) -> None:
    """Ray 2.60 looks up vLLM's tokenizer service as `openai_serving_tokenization`; vLLM 0.29
    names it `serving_tokenization`, which leaves /tokenize disabled. Fill it in."""
    state = getattr(engine, "_app_state", None)
    if getattr(engine, "_oai_serving_tokenization", True) is None and state is not None:
        engine._oai_serving_tokenization = getattr(state, "serving_tokenization", None)


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
