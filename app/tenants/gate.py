"""An asyncio gate over `FairQueue`: at most `capacity` requests of a model in flight, the rest
wait in fair order. The ingress holds one per model (`app.ingress.gateway`); the queue's rule is
in `fair_queue`."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

from app.tenants.fair_queue import FairQueue, Rejected, Ticket


class QueueFull(Exception):
    """The tenant's queue is full: answer 429 with `Retry-After: rejected.retry_after`."""

    def __init__(self, rejected: Rejected) -> None:
        super().__init__(f"tenant {rejected.tenant!r}: admission queue full")
        self.rejected = rejected


class WaitExpired(Exception):
    """The request waited `max_wait_s` without a slot."""


@dataclass(slots=True)
class Slot:
    """A granted slot: `settle` with the answer's usage (else the estimate stands)."""

    gate: AdmissionGate
    ticket: Ticket
    settled: bool = False

    def settle(self, prompt_tokens: int, output_tokens: int) -> None:
        if not self.settled:
            self.settled = True
            self.gate.queue.charge(
                self.ticket.tenant, prompt_tokens, output_tokens, self.ticket.cost
            )


class AdmissionGate:
    """One model's admission: `async with gate.admit(tenant, priority, cost) as slot: ...`.

    1. Every request is pushed onto the fair queue (a full tenant queue raises `QueueFull`).
    2. While fewer than `capacity` requests hold a slot, the queue's next request gets one.
    3. A request still waiting after the queue's `max_wait_s` raises `WaitExpired`; one whose
       caller goes away is taken out of the queue (or gives its slot back).
    4. Leaving the `async with` block frees the slot, and the next waiter gets it.

    `capacity` is a number, or a function read at each grant (e.g. the model's running replicas
    times their slots, so the gate follows scaling); it counts as at least 1.
    """

    def __init__(
        self,
        capacity: int | Callable[[], int],
        queue: FairQueue[asyncio.Future[None]] | None = None,
    ):
        if not callable(capacity) and capacity < 1:
            raise ValueError("capacity >= 1")
        self._capacity = capacity
        self.queue: FairQueue[asyncio.Future[None]] = queue if queue is not None else FairQueue()
        self.in_flight = 0

    @property
    def capacity(self) -> int:
        """Requests allowed in flight now."""
        capacity = self._capacity
        return max(1, capacity() if callable(capacity) else capacity)

    @asynccontextmanager
    async def admit(
        self, tenant: str, priority: int = 0, cost_estimate: float = 0.0
    ) -> AsyncIterator[Slot]:
        """Wait for a slot in fair order; hold it for the block."""
        ticket = await self._acquire(tenant, priority, cost_estimate)
        try:
            yield Slot(self, ticket)
        finally:
            self._release()

    async def _acquire(self, tenant: str, priority: int, cost: float) -> Ticket:
        granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        ticket = self.queue.push(granted, tenant, priority, cost)
        if isinstance(ticket, Rejected):
            raise QueueFull(ticket)
        self._dispatch()
        try:
            await asyncio.wait({granted}, timeout=self.queue.max_wait_s)
        except asyncio.CancelledError:
            if not self.queue.cancel(ticket) and granted.done() and not granted.exception():
                self._release()  # the slot came with the cancellation: give it back
            raise
        if not granted.done():
            self.queue.cancel(ticket)
            self.queue.take_dropped()
            raise WaitExpired(f"tenant {tenant!r}: no slot within {self.queue.max_wait_s:g} s")
        granted.result()  # WaitExpired set by the queue's own expiry
        return ticket

    def _dispatch(self) -> None:
        capacity = self.capacity
        while self.in_flight < capacity:
            granted = self.queue.pop()
            for dropped in self.queue.take_dropped():
                if not dropped.item.done():
                    dropped.item.set_exception(WaitExpired(f"{dropped.reason} in the queue"))
            if granted is None:
                return
            if granted.done():  # its waiter is gone
                continue
            self.in_flight += 1
            granted.set_result(None)

    def _release(self) -> None:
        self.in_flight -= 1
        self._dispatch()
