"""Simulated engine deployments: simulators standing in for engine servers, with no model.

`SimulatedEngineServer` stands in for our `EngineServer`: it answers `serve_openai` with
OpenAI-shaped bodies and streams after a fixed delay, so load, fault and overhead tests can drive
the real ingress, router and Ray Serve proxy at a scale no CPU engine reaches.
`SimulatedLLMServer` stands in for stock Ray Serve LLM's `LLMServer` behind stock `OpenAiIngress`
(its `completions` / `chat` methods), for the overhead benchmark (`benchmarks.overhead`).
Neither is ever built from a serve config: tests and benchmarks bind them.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncGenerator
from typing import Any

from ray import serve

from app.engines.items import Endpoint, EngineItem


def _token_count(body: dict[str, Any], tokens: int | None) -> int:
    """`tokens` if set, else the request's `max_tokens` (at least 1)."""
    if tokens is not None:
        return tokens
    return max(1, int(body.get("max_tokens") or body.get("max_completion_tokens") or 16))


async def _sse_stream(body: dict[str, Any], delay_s: float, tokens: int) -> AsyncGenerator[str]:
    """`tokens` SSE text chunks `delay_s / tokens` apart, a usage chunk if asked, then [DONE]."""
    created, rid = int(time.time()), f"sim-{uuid.uuid4().hex[:12]}"
    for _ in range(tokens):
        await asyncio.sleep(delay_s / tokens)
        chunk = _completion(rid, created, body, "sim ", tokens, usage=False)
        yield f"data: {json.dumps(chunk)}\n\n"
    if (body.get("stream_options") or {}).get("include_usage"):
        usage = {**_completion(rid, created, body, "", tokens), "choices": []}
        yield f"data: {json.dumps(usage)}\n\n"
    yield "data: [DONE]\n\n"


def _batched(stream: AsyncGenerator[str], batch_ms: float) -> AsyncGenerator:
    """`stream` itself, or with `batch_ms` lists of its items, every `batch_ms` ms."""
    if not batch_ms:
        return stream
    from ray.llm._internal.serve.utils.batcher import Batcher

    return Batcher(stream, interval_ms=batch_ms).stream()


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000)
class SimulatedEngineServer:
    """Answers after `delay_s`; streams `tokens` chunks `delay_s / tokens` apart (`tokens=None`:
    the request's `max_tokens`), one item each, or with `batch_ms` the chunks gathered every
    `batch_ms` ms by stock's `Batcher` (as `LLMServer` gathers them), one item a batch."""

    def __init__(self, delay_s: float = 0.01, tokens: int | None = 4, batch_ms: float = 0) -> None:
        self._delay_s = delay_s
        self._tokens = tokens
        self._batch_ms = batch_ms
        self._in_flight = 0

    async def record_routing_stats(self) -> dict[str, Any]:
        return {"in_flight": self._in_flight}

    async def serve_openai(
        self, endpoint: Endpoint, body: dict[str, Any], *, route: dict | None = None
    ) -> AsyncGenerator[EngineItem, None]:
        self._in_flight += 1
        try:
            tokens = _token_count(body, self._tokens)
            if not body.get("stream"):
                await asyncio.sleep(self._delay_s)
                rid, created = f"sim-{uuid.uuid4().hex[:12]}", int(time.time())
                yield {"body": _completion(rid, created, body, "sim " * tokens, tokens)}
                return
            async for text in _batched(_sse_stream(body, self._delay_s, tokens), self._batch_ms):
                yield {"sse": text if isinstance(text, str) else "".join(text)}
        finally:
            self._in_flight -= 1


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000)
class SimulatedLLMServer:
    """Stock `LLMServer`'s streaming `completions`/`chat` methods as stock `OpenAiIngress` calls
    them, `(request, raw_request_info)`; streams only. With `batch_ms` it yields lists of SSE
    strings gathered by stock's own `Batcher` every `batch_ms` ms, as `LLMServer` does (50 ms by
    default); with `batch_ms=0`, one SSE string per token."""

    def __init__(
        self, delay_s: float = 0.0, tokens: int | None = None, batch_ms: float = 0
    ) -> None:
        self._delay_s = delay_s
        self._tokens = tokens
        self._batch_ms = batch_ms

    async def check_health(self) -> None:
        return None

    async def completions(self, request: Any, raw_request_info: Any = None) -> AsyncGenerator:
        body = request.model_dump(exclude_unset=True)
        stream = _sse_stream(body, self._delay_s, _token_count(body, self._tokens))
        async for item in _batched(stream, self._batch_ms):
            yield item

    async def chat(self, request: Any, raw_request_info: Any = None) -> AsyncGenerator:
        async for item in self.completions(request, raw_request_info):
            yield item


def _completion(
    rid: str, created: int, body: dict[str, Any], text: str, tokens: int, usage: bool = True
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": rid,
        "object": "text_completion",
        "created": created,
        "model": body.get("model"),
        "choices": [{"index": 0, "text": text, "finish_reason": "length", "logprobs": None}],
    }
    if usage:
        out["usage"] = {"prompt_tokens": 1, "completion_tokens": tokens, "total_tokens": tokens + 1}
    return out
