"""The end of an application's detached actors (the quota ledger, the capture store): each ends
itself once no ingress replica has called it for a while, so nothing outlives the stack."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

logger = logging.getLogger("vrstack")


async def end_when_idle(idle_s: Callable[[], float], exit_s: float, what: str) -> None:
    """Kill the calling Ray actor once `idle_s()` (seconds since its last call) exceeds
    `exit_s`; run as a task of the actor. `what` names it in the log."""
    import ray

    while idle_s() <= exit_s:
        await asyncio.sleep(min(1.0, exit_s / 4))
    logger.info("no ingress replica for %.0f s: the %s ends", exit_s, what)
    ray.kill(ray.get_runtime_context().current_actor, no_restart=True)
