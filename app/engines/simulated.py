"""A simulated engine deployment: a simulator standing in for `EngineServer`, with no model.

It answers `serve_openai` with OpenAI-shaped bodies and streams after a fixed delay, so load,
fault and overhead tests can drive the real ingress, router and Ray Serve proxy at a scale no
CPU engine reaches. It is never built from a serve config: tests and benchmarks bind it.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncGenerator
from typing import Any

from ray import serve

from app.wire import Endpoint, EngineItem


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000)
class SimulatedEngineServer:
    """Answers after `delay_s`; streams `tokens` chunks `delay_s / tokens` apart."""

    def __init__(self, delay_s: float = 0.01, tokens: int = 4) -> None:
        self._delay_s = delay_s
        self._tokens = tokens
        self._in_flight = 0

    async def record_routing_stats(self) -> dict[str, Any]:
        return {"in_flight": self._in_flight}

    async def serve_openai(
        self, endpoint: Endpoint, body: dict[str, Any], *, route: dict | None = None
    ) -> AsyncGenerator[EngineItem, None]:
        self._in_flight += 1
        try:
            created, rid = int(time.time()), f"sim-{uuid.uuid4().hex[:12]}"
            if not body.get("stream"):
                await asyncio.sleep(self._delay_s)
                yield {"body": _completion(rid, created, body, "sim " * self._tokens)}
                return
            for _ in range(self._tokens):
                await asyncio.sleep(self._delay_s / self._tokens)
                chunk = _completion(rid, created, body, "sim ")
                yield {"sse": f"data: {json.dumps(chunk)}\n\n"}
            yield {"sse": "data: [DONE]\n\n"}
        finally:
            self._in_flight -= 1


def _completion(rid: str, created: int, body: dict[str, Any], text: str) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "text_completion",
        "created": created,
        "model": body.get("model"),
        "choices": [{"index": 0, "text": text, "finish_reason": "length", "logprobs": None}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 4, "total_tokens": 5},
    }
