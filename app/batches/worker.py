"""Batch requests run in each ingress replica, as the engines' lowest-priority work.

`BatchWorker.run` claims requests from the application's batch store (`app.batches.store`) and
answers each through the gateway's Python path (the engine deployment's handle, routed by the
model's request router), so batch work never waits in the HTTP path's queues:

1. At most `max_concurrent` batch requests of a model run at once in this replica (claims are
   bounded by that times the number of models).
2. A batch request starts only while the model's engines answer at most
   `batches.max_interactive` interactive requests (default 0: only when they are idle) and
   have none waiting in their queues, as they last reported (every 2 s): batch work fills the
   engines' idle time and yields as soon as interactive traffic comes.
3. On engines that schedule by priority, batch requests carry `batches.priority` (below every
   tenant's class), so the engine runs interactive requests first.
Each answer is reported as a line of the output (2xx) or error file; a request failing with a
5xx (no replica ready, an engine restarting) is tried again a few times first. A replica that
dies with claimed requests leaves them to the store's lease, which hands them out again.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Callable
from typing import Any

from pydantic import ValidationError

from app.batches.requests import ENDPOINTS, request_of
from app.batches.store import Work, result_line
from app.config.batches import BatchSettings
from app.engines import router_registry
from app.errors import OpenAIError, error_body, validation_message

logger = logging.getLogger("vrstack.batches")
POLL_S = 1.0  # how often an idle worker asks the store for requests
WAIT_S = 0.5  # how often a request waiting for its model's engines looks again
ATTEMPTS = 5  # a request failing with a 5xx (no replica yet, an engine restarting) is tried
RETRY_S = 2.0  # again this many times, 2, 4, 8, ... s apart, before its failure is its answer


def engines_busy(model: str) -> tuple[int, int]:
    """(interactive requests in flight, requests waiting in their queues) at the model's
    engines, as they last reported (`in_flight`: the requests on each replica's own port)."""
    replicas = router_registry.snapshot().get(model, {}).values()
    return (
        sum(int(stats.get("in_flight") or 0) for stats in replicas),
        sum(int(stats.get("queued") or 0) for stats in replicas),
    )


class BatchWorker:
    """Runs the application's batch requests in this ingress replica (see the module
    docstring). `gateway`: an `app.ingress.gateway.Gateway`; `store`: the batch store's
    client."""

    def __init__(
        self,
        gateway: Any,
        store: Any,
        settings: BatchSettings,
        *,
        busy: Callable[[str], tuple[int, int]] = engines_busy,
        poll_s: float = POLL_S,
    ) -> None:
        self.gateway, self.store, self.settings = gateway, store, settings
        self._busy, self._poll_s = busy, poll_s
        models = [spec.name for spec in gateway.config.models]
        self._slots = {name: asyncio.Semaphore(settings.max_concurrent) for name in models}
        self._room = asyncio.Semaphore(settings.max_concurrent * len(models))
        self._tasks: set[asyncio.Task] = set()

    async def run(self) -> None:
        """Claim and run requests until cancelled."""
        while True:
            await self._room.acquire()
            try:
                claimed = await self.store.claim(1)
            except Exception as exc:  # the store is restarting: later
                logger.warning("batches: the store cannot be reached: %r", exc)
                claimed = []
            if not claimed:
                self._room.release()
                await asyncio.sleep(self._poll_s)
                continue
            task = asyncio.create_task(self._run(claimed[0]))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run(self, work: Work) -> None:
        try:
            request_id = f"batch-{secrets.token_hex(8)}"
            status, body = await self._answer(work)
            for attempt in range(1, ATTEMPTS):
                if status < 500:
                    break
                await asyncio.sleep(RETRY_S * 2 ** (attempt - 1))
                status, body = await self._answer(work)
            line = result_line(work, status, body, request_id)
            await self.store.report(work.batch_id, work.index, 200 <= status < 300, line)
        except Exception:  # the store or the lease will hand it out again
            logger.exception("batches: request %s of %s failed", work.index, work.batch_id)
        finally:
            self._room.release()

    def _may_start(self, model: str) -> bool:
        interactive, queued = self._busy(model)
        limit = self.settings.max_interactive
        return queued == 0 and (limit is None or interactive <= limit)

    async def _answer(self, work: Work) -> tuple[int, dict[str, Any]]:
        """(status, body) of one batch request, as the endpoint answers it online."""
        try:
            request = request_of(work.url, work.body)
            spec = self.gateway.resolve(request.model)
            async with self._slots[spec.name]:
                while not self._may_start(spec.name):
                    await asyncio.sleep(WAIT_S)
                body = await self.gateway.call(
                    ENDPOINTS[work.url], request, priority=self.settings.priority
                )
            return 200, body
        except ValidationError as exc:
            message, param = validation_message(exc)
            return 400, error_body(400, message, param=param)
        except OpenAIError as exc:
            return exc.status, exc.body()
