"""Per-model readiness from Ray Serve's own status (replicas RUNNING per engine deployment)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from app.config import ModelSpec
from app.engines.llm_config import deployment_name
from app.errors import OpenAIError
from app.ray_internals import serve_details

logger = logging.getLogger("vrstack.ingress")
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
    """RUNNING replicas per deployment of `app_name`, from the Serve controller's plain details
    (`app.ray_internals.serve_details`: a tenth of `serve.status()`'s CPU)."""

    def count() -> dict[str, int]:
        app = (serve_details().get("applications") or {}).get(app_name)
        if not app:
            return {}
        return {
            name: sum(_is_running(r.get("state")) for r in details.get("replicas") or ())
            for name, details in (app.get("deployments") or {}).items()
        }

    return count


def _is_running(state: object) -> bool:
    return str(getattr(state, "value", state)) == "RUNNING"


class Readiness:
    """Replica counts from `counter`, cached so checks don't flood the Serve controller.

    1. A model with running replicas in the cache is answered from it at once; when the cache
       is older than `ready_ttl_s`, a refresh starts in the background (requests never wait
       for the controller once their model is up).
    2. A model without running replicas waits for a fresh count when the cache is older than
       `ttl_s`, so it turns ready within about `ttl_s` of its first replica starting.
    """

    def __init__(
        self, counter: ReplicaCounter, *, ttl_s: float = 1.0, ready_ttl_s: float = 5.0
    ) -> None:
        self._counter = counter
        self._ttl_s = ttl_s
        self._ready_ttl_s = ready_ttl_s
        self._counts: dict[str, int] = {}
        self._at = float("-inf")
        self._lock = asyncio.Lock()
        self._background: asyncio.Task | None = None

    async def _running(self, deployment: str) -> int:
        age = time.monotonic() - self._at
        if self._counts.get(deployment, 0) > 0:
            if age > self._ready_ttl_s and (self._background is None or self._background.done()):
                self._background = asyncio.create_task(self._refresh_quietly())
            return self._counts[deployment]
        if age > self._ttl_s:
            await self._refresh(self._ttl_s)
        return self._counts.get(deployment, 0)

    async def _refresh(self, ttl_s: float) -> None:
        async with self._lock:  # one controller call at a time; waiters reuse its answer
            if time.monotonic() - self._at > ttl_s:
                self._counts = await asyncio.to_thread(self._counter)
                self._at = time.monotonic()

    async def _refresh_quietly(self) -> None:
        try:
            await self._refresh(self._ready_ttl_s)
        except Exception as exc:  # the cached counts stay; the next check tries again
            logger.warning("replica counts not refreshed: %s: %s", type(exc).__name__, exc)

    async def state(self, spec: ModelSpec) -> ModelState:
        running = await self._running(deployment_name(spec))
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
