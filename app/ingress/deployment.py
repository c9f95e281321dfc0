"""The ingress as a Ray Serve deployment: HTTP through FastAPI, Python through handle methods."""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, Mapping
from typing import Any

from pydantic import ValidationError
from ray import serve

from app.config import load_config
from app.engines.items import Endpoint
from app.errors import OpenAIError, validation_message
from app.ingress.asgi import create_app
from app.ingress.gateway import DONE, EngineHandle, Gateway
from app.ingress.protocol import ChatCompletionRequest, CompletionRequest, SamplingRequest
from app.ingress.readiness import Readiness, serve_replica_counter

_REQUESTS: dict[Endpoint, type[SamplingRequest]] = {
    "completions": CompletionRequest,
    "chat": ChatCompletionRequest,
}


@serve.deployment
@serve.ingress()
class Ingress:
    """OpenAI-compatible front door for every model of one stack.

    Python callers use the handle methods (`completions`, `chat`, and their `_stream`
    variants) with OpenAI request bodies as dicts; they get the same checks as HTTP.
    """

    async def __init__(self, config: dict[str, Any], engines: Mapping[str, EngineHandle]) -> None:
        stack = load_config(config)
        app_name = serve.get_replica_context().app_name
        self.gateway = Gateway(stack, engines, Readiness(serve_replica_counter(app_name)))

    async def __serve_build_asgi_app__(self) -> Any:
        return create_app(self.gateway)

    async def completions(self, body: dict[str, Any]) -> dict[str, Any]:
        """A completion (non-streaming); raises OpenAIError on bad input."""
        return await self.gateway.call("completions", _parse("completions", body, stream=False))

    async def chat(self, body: dict[str, Any]) -> dict[str, Any]:
        """A chat completion (non-streaming); raises OpenAIError on bad input."""
        return await self.gateway.call("chat", _parse("chat", body, stream=False))

    async def completions_stream(
        self, body: dict[str, Any]
    ) -> AsyncGenerator[dict[str, Any], None]:
        """Completion chunks as dicts (call with `handle.options(stream=True)`)."""
        async for chunk in self._chunks("completions", body):
            yield chunk

    async def chat_stream(self, body: dict[str, Any]) -> AsyncGenerator[dict[str, Any], None]:
        """Chat completion chunks as dicts (call with `handle.options(stream=True)`)."""
        async for chunk in self._chunks("chat", body):
            yield chunk

    async def _chunks(self, endpoint: Endpoint, body: dict[str, Any]) -> AsyncGenerator[dict, None]:
        stream = await self.gateway.open(endpoint, _parse(endpoint, body, stream=True))
        async for text in stream.sse():
            for line in text.splitlines():
                if not line.startswith("data: ") or line == DONE.strip():
                    continue
                chunk = json.loads(line.removeprefix("data: "))
                if "error" in chunk:
                    code = chunk["error"].get("code")
                    raise OpenAIError.from_body(code if isinstance(code, int) else 500, chunk)
                yield chunk


def _parse(endpoint: Endpoint, body: dict[str, Any], *, stream: bool) -> SamplingRequest:
    try:
        return _REQUESTS[endpoint].model_validate({**body, "stream": stream})
    except ValidationError as exc:
        message, param = validation_message(exc)
        raise OpenAIError(400, message, param=param) from None
