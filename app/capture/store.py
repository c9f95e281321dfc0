"""The cluster's captured requests: one bounded store per Serve application, fed by every ingress
replica, read by `GET /capture`.

`CaptureStore` is plain Python (tests and a single process use it through `LocalStore`);
`ActorStore` is its client through a named, detached Ray actor (`StoreActor`, `capture:<app>`
in the `vrstack` namespace), got or created by the first replica that flushes; it ends itself
once no replica has called it for `idle_exit_s` (replicas call it every `flush_s`, records or
not, while capture is on), as the quota ledger does (`app.tenants.ledger`).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from app.idle_actor import end_when_idle
from app.lab.trace import TraceRequest
from app.tenants.ledger import NAMESPACE

IDLE_EXIT_S = 120.0


class CaptureStore:
    """The newest `max_records` requests of every replica, each with its wall-clock arrival in
    `t` (seconds since the epoch); older ones are dropped (and counted)."""

    def __init__(self, max_records: int, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.records: deque[TraceRequest] = deque(maxlen=max_records)
        self.dropped = 0
        self._clock = clock
        self.last_call = clock()

    def add(self, batch: Sequence[TraceRequest], dropped: int = 0) -> None:
        """A replica's records (and how many it had to drop itself)."""
        self.last_call = self._clock()
        room = self.records.maxlen or 0
        self.dropped += dropped + max(0, len(self.records) + len(batch) - room)
        self.records.extend(batch)

    def read(self, since: float = 0.0) -> list[TraceRequest]:
        """The records that arrived at or after `since` (epoch seconds), oldest first."""
        self.last_call = self._clock()
        return sorted((r for r in self.records if r.t >= since), key=lambda r: r.t)

    def status(self) -> dict[str, Any]:
        """How many records are kept and were dropped; the oldest and newest arrival."""
        times = [r.t for r in self.records]
        return {
            "records": len(times),
            "dropped": self.dropped,
            "oldest": min(times, default=None),
            "newest": max(times, default=None),
            "now": time.time(),
        }


class LocalStore:
    """A `CaptureStore` in this process, with the actor client's interface."""

    def __init__(self, store: CaptureStore) -> None:
        self.store = store

    async def add(self, batch: Sequence[TraceRequest], dropped: int = 0) -> None:
        self.store.add(batch, dropped)

    async def read(self, since: float = 0.0) -> list[TraceRequest]:
        return self.store.read(since)

    async def status(self) -> dict[str, Any]:
        return self.store.status()


class StoreActor:
    """The `CaptureStore` as a Ray actor (async, so it can watch its own idleness)."""

    def __init__(self, max_records: int, idle_exit_s: float = IDLE_EXIT_S) -> None:
        self.store = CaptureStore(max_records)
        self.idle_exit_s = idle_exit_s
        self._watch: asyncio.Task | None = None

    async def add(self, batch: Sequence[TraceRequest], dropped: int = 0) -> None:
        if self._watch is None:
            self._watch = asyncio.create_task(self._end_when_idle())
        self.store.add(batch, dropped)

    async def read(self, since: float = 0.0) -> list[TraceRequest]:
        return self.store.read(since)

    async def status(self) -> dict[str, Any]:
        return self.store.status()

    async def _end_when_idle(self) -> None:
        await end_when_idle(
            lambda: time.monotonic() - self.store.last_call, self.idle_exit_s, "capture store"
        )


def store_name(app_name: str) -> str:
    """The capture store actor's name for a Serve application (in namespace `NAMESPACE`)."""
    return f"capture:{app_name}"


class ActorStore:
    """The client of an application's capture store actor: got, or created detached (it
    outlives a redeploy's replicas, and ends itself once idle)."""

    def __init__(self, name: str, max_records: int, *, idle_exit_s: float = IDLE_EXIT_S) -> None:
        self.name = name
        self.max_records = max_records
        self.idle_exit_s = idle_exit_s
        self._actor: Any = None

    def _handle(self) -> Any:
        if self._actor is None:
            import ray

            options = {"name": self.name, "namespace": NAMESPACE, "lifetime": "detached",
                       "get_if_exists": True, "num_cpus": 0, "max_restarts": 0}  # fmt: skip
            actor = ray.remote(StoreActor).options(**options)
            self._actor = actor.remote(self.max_records, self.idle_exit_s)
        return self._actor

    async def _call(self, method: str, *args: Any) -> Any:
        try:
            return await getattr(self._handle(), method).remote(*args)
        except Exception:
            self._actor = None  # gone (idle, or its node lost): get or create it next time
            raise

    async def add(self, batch: Sequence[TraceRequest], dropped: int = 0) -> None:
        await self._call("add", list(batch), dropped)

    async def read(self, since: float = 0.0) -> list[TraceRequest]:
        return await self._call("read", since)

    async def status(self) -> dict[str, Any]:
        return await self._call("status")
