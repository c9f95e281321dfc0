"""A test double of a Ray Serve `DeploymentHandle` to an engine deployment.

It stands in for Ray and vLLM (not for our code) so the ingress's HTTP behaviour can be tested
in-process: it answers `serve_openai(endpoint, body)` with the plain items a real `EngineServer`
yields, and can be told to fail, hang or break a stream midway.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any


class ActorDiedError(Exception):
    """Named like Ray's exception for a dead replica."""


class SimulatedEngine:
    def __init__(self, name: str, *, mode: str = "ok", tokens: int = 3) -> None:
        self.name = name
        self.mode = (
            mode  # ok | error400 | hang | die | die_once | slow | break_stream | hang_stream
        )
        self.tokens = tokens
        self.calls: list[tuple[str, dict]] = []
        self.cancelled = 0

    # DeploymentHandle API used by the gateway
    def options(self, **_: Any) -> SimulatedEngine:
        return self

    def remote(self, endpoint: str, body: dict, route: dict | None = None) -> _Generator:
        self.calls.append((endpoint, body))
        if route is not None:  # what the request router writes in the caller's process
            route.update(
                replica_id=f"{self.name}-r1",
                policy="scored",
                reason="least-load",
                request_id=f"{self.name}-{len(self.calls)}",
            )
        return _Generator(self, endpoint, body)


class _Generator:
    def __init__(self, engine: SimulatedEngine, endpoint: str, body: dict) -> None:
        self._engine = engine
        self._items = self._run(endpoint, body)

    def __aiter__(self) -> _Generator:
        return self

    async def __anext__(self) -> dict:
        return await self._items.__anext__()

    def cancel(self) -> None:
        self._engine.cancelled += 1

    async def _run(self, endpoint: str, body: dict):
        mode = self._engine.mode
        if mode == "hang":
            await asyncio.sleep(3600)
        if mode == "die" or (mode == "die_once" and len(self._engine.calls) == 1):
            raise ActorDiedError("replica actor died: pid=1234 node=abc")
        if mode == "slow":
            await asyncio.sleep(0.3)
        if mode == "error400":
            yield {
                "status": 400,
                "error": {
                    "message": "prompt too long",
                    "type": "BadRequestError",
                    "param": "prompt",
                    "code": 400,
                },
            }
            return
        if not body.get("stream"):
            yield {
                "body": {
                    "object": endpoint,
                    "model": body["model"],
                    "echo": body,
                    "created": int(time.time()),
                }
            }
            return
        for i in range(self._engine.tokens):
            if mode == "break_stream" and i == 1:
                raise ActorDiedError("replica died mid-stream")
            if mode == "hang_stream" and i == 1:
                await asyncio.sleep(3600)
            yield {"sse": f'data: {{"choices": [{{"index": 0, "text": "t{i}"}}]}}\n\n'}
        yield {"sse": "data: [DONE]\n\n"}
