"""Per-model readiness from Ray Serve's own status (replicas RUNNING per engine deployment)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

from app.config import ModelSpec
from app.engines.builder import deployment_name
from app.ingress.errors import OpenAIError

ReplicaCounter = Callable[[], dict[str, int]]


@dataclass(frozen=True)
class ModelState:
    name: str
    ready: bool
    running_replicas: int
    scales_to_zero: bool

    def as_dict(self) -> dict[str, object]:
        return {"ready": self.ready, "running_replicas": self.running_replicas}


def serve_replica_counter(app_name: str) -> ReplicaCounter:
    """RUNNING replicas per deployment of `app_name`, read from the Serve controller."""

    def count() -> dict[str, int]:
        from ray import serve

        app = serve.status().applications.get(app_name)
        if app is None:
            return {}
        return {
            name: status.replica_states.get("RUNNING", 0)
            for name, status in app.deployments.items()
        }

    return count


class Readiness:
    """Replica counts, cached for `ttl_s` so checks don't flood the Serve controller."""

    def __init__(self, counter: ReplicaCounter, *, ttl_s: float = 1.0) -> None:
        self._counter = counter
        self._ttl_s = ttl_s
        self._counts: dict[str, int] = {}
        self._at = float("-inf")
        self._lock = asyncio.Lock()

    async def _replicas(self) -> dict[str, int]:
        async with self._lock:
            if time.monotonic() - self._at > self._ttl_s:
                self._counts = await asyncio.to_thread(self._counter)
                self._at = time.monotonic()
            return self._counts

    async def state(self, spec: ModelSpec) -> ModelState:
        running = (await self._replicas()).get(deployment_name(spec), 0)
        scales_to_zero = spec.autoscaling is not None and spec.autoscaling.min_replicas == 0
        return ModelState(spec.name, running > 0, running, scales_to_zero)

    async def require(self, spec: ModelSpec) -> None:
        """Raise 503 when the model has no running replica (unless it scales from zero)."""
        state = await self.state(spec)
        if not state.ready and not state.scales_to_zero:
            raise OpenAIError(
                503,
                f"model {spec.name!r} has no ready replica yet; retry shortly",
                code="model_not_ready",
            )
