"""An asyncio gate over `FairQueue`: at most `capacity` requests of a model in flight, the rest
wait in fair order, and a waiter may stop a less important request to take its slot. The
ingress holds one per model (`app.ingress.gateway`); the queue's rule is in `fair_queue`, the
choice of the request to stop in `preemption`."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Hashable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from app.tenants.fair_queue import FairQueue, Rejected, Ticket
from app.tenants.preemption import Holder, victim


class QueueFull(Exception):
    """The tenant's queue is full: answer 429 with `Retry-After: rejected.retry_after`."""

    def __init__(self, rejected: Rejected) -> None:
        super().__init__(f"tenant {rejected.tenant!r}: admission queue full")
        self.rejected = rejected


class WaitExpired(Exception):
    """The request waited `max_wait_s` without a slot."""


@dataclass(eq=False, slots=True)
class Slot:
    """A granted slot: `settle` with the answer's usage (else the estimate stands).

    Its holder may offer it (`stoppable`) with a function the gate calls to take the slot for
    a more important waiter (see `AdmissionGate`): it answers whether the request is being
    stopped, and the holder then calls `resume` to wait for a slot again."""

    gate: AdmissionGate
    ticket: Ticket
    settled: bool = False
    held: bool = True
    granted_at: float = field(default_factory=time.monotonic)
    stop: Callable[[], bool] | None = None
    place: Hashable | None = None  # the engine its request is on (see `placed`)
    answering: bool = False  # that engine has begun to answer
    stopped_in: int | None = None  # the class it stood in when it was stopped
    stops: int = 0  # times it was stopped

    def settle(self, prompt_tokens: int, output_tokens: int) -> None:
        if not self.settled:
            self.settled = True
            self.gate.queue.charge(
                self.ticket.tenant, prompt_tokens, output_tokens, self.ticket.cost
            )

    def stoppable(self, stop: Callable[[], bool] | None) -> None:
        """Offer the slot to more important waiters (`stop`), or withdraw the offer (None)."""
        self.stop = stop if self.held else None
        if stop is not None and self.held:
            self.gate._dispatch()  # a waiter may take it now

    def placed(self, place: Hashable | None, *, answering: bool = False) -> None:
        """Where its request is now (`place`: the engine replica it was sent to; None: between
        attempts) and whether that engine has begun to answer it. A waiter stops a holder on
        the engine with the fewest requests in their prefill first, and among those one that
        answers (`preemption.soonest_served`)."""
        self.place, self.answering = place, answering and place is not None

    async def resume(self) -> None:
        """Give the slot up (a stopped request) and wait, first in its tenant's queue, in the
        class it was stopped in (so never before the waiter that stopped it) and without a
        deadline, for another; a cancellation while waiting leaves the slot given up. The slot
        keeps its first ticket (its class, and the estimate `settle` settles)."""
        self.stop = None
        self.placed(None)
        self.gate.release(self)
        priority = self.ticket.priority if self.stopped_in is None else self.stopped_in
        await self.gate.acquire(self.ticket.tenant, priority, 0.0, first=True)
        self.held, self.granted_at = True, time.monotonic()
        self.gate.holding.add(self)


class AdmissionGate:
    """One model's admission: `async with gate.admit(tenant, priority, cost) as slot: ...`.

    1. Every request is pushed onto the fair queue (a full tenant queue raises `QueueFull`).
    2. While fewer than `capacity` requests hold a slot, the queue's next request gets one.
    3. With `preempt`, when every slot is held, the queue's next waiter stops a holder of a
       less important class (as it stands now: `FairQueue.standing`) and of another tenant
       that can be stopped (`Slot.stop`; `preemption.victim` chooses, from where each
       holder's request is: `Slot.placed`), one at a time; the stopped request gives its slot
       up (`Slot.resume`) and waits first in its tenant's queue to go on.
    4. A request still waiting after the queue's `max_wait_s` raises `WaitExpired`; one whose
       caller goes away is taken out of the queue (or gives its slot back).
    5. Leaving the `async with` block frees the slot, and the next waiter gets it.

    `capacity` is a number, or a function read at each grant (e.g. the model's running replicas
    times their slots, so the gate follows scaling); it counts as at least 1.
    """

    def __init__(
        self,
        capacity: int | Callable[[], int],
        queue: FairQueue[asyncio.Future[None]] | None = None,
        *,
        preempt: bool = False,
    ):
        if not callable(capacity) and capacity < 1:
            raise ValueError("capacity >= 1")
        self._capacity = capacity
        self.queue: FairQueue[asyncio.Future[None]] = queue if queue is not None else FairQueue()
        self.preempt = preempt
        self.in_flight = 0
        self.holding: set[Slot] = set()
        self.preempted = 0  # holders told to stop, ever
        self._told: set[Slot] = set()  # told to stop, their slot not given up yet

    @property
    def stopping(self) -> int:
        """Holders told to stop that have not given their slot up yet."""
        return len(self._told)

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
        slot = Slot(self, await self.acquire(tenant, priority, cost_estimate))
        self.holding.add(slot)
        try:
            yield slot
        finally:
            self.release(slot)

    async def acquire(
        self, tenant: str, priority: int, cost: float, *, first: bool = False
    ) -> Ticket:
        """Wait for a slot (`FairQueue.push`'s arguments); its ticket once granted. Prefer
        `admit`, which gives it back."""
        granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        ticket = self.queue.push(granted, tenant, priority, cost, first=first)
        if isinstance(ticket, Rejected):
            raise QueueFull(ticket)
        self._dispatch()
        try:
            await asyncio.wait({granted}, timeout=None if first else self.queue.max_wait_s)
        except asyncio.CancelledError:
            if not self.queue.cancel(ticket) and granted.done() and not granted.exception():
                self.in_flight -= 1  # the slot came with the cancellation: give it back
                self._dispatch()
            raise
        if not granted.done():
            self.queue.cancel(ticket)
            self.queue.take_dropped()
            raise WaitExpired(f"tenant {tenant!r}: no slot within {self.queue.max_wait_s:g} s")
        granted.result()  # WaitExpired set by the queue's own expiry
        return ticket

    def release(self, slot: Slot) -> None:
        """Give a slot back (once; `admit` does it when its block ends)."""
        if not slot.held:
            return
        slot.held = False
        slot.stop = None
        self.holding.discard(slot)
        self._told.discard(slot)
        self.in_flight -= 1
        self._dispatch()

    def _dispatch(self) -> None:
        """Grant free slots and, with `preempt`, stop a holder for the next waiter if it may."""
        capacity = self.capacity
        while self.in_flight < capacity:
            granted = self.queue.pop()
            self._fail_dropped()
            if granted is None:
                return
            if granted.done():  # its waiter is gone
                continue
            self.in_flight += 1
            granted.set_result(None)
        if self.preempt and not self.stopping and len(self.queue):
            self._preempt()

    def _preempt(self) -> None:
        """Tell one holder of a less important class than the next waiter's to stop."""
        head = self.queue.peek()
        self._fail_dropped()
        if head is None:
            return
        standing = self.queue.standing
        prefills = Counter(s.place for s in self.holding if s.place is not None and not s.answering)
        candidates = {
            s: Holder(s, standing(s.ticket), s.granted_at, s.ticket.tenant, s.answering,
                      prefills[s.place], s.stops)
            for s in self.holding
            if s.stop is not None
        }  # fmt: skip
        waiter = standing(head, waiting=True)
        while candidates:
            chosen = victim(waiter, candidates.values(), waiter_tenant=head.tenant)
            if chosen is None:
                return
            slot = chosen.key
            stop, slot.stop = slot.stop, None
            del candidates[slot]
            if stop is not None and stop():
                slot.stopped_in = chosen.priority
                slot.stops += 1
                self._told.add(slot)
                self.preempted += 1
                return

    def _fail_dropped(self) -> None:
        for dropped in self.queue.take_dropped():
            if not dropped.item.done():
                dropped.item.set_exception(WaitExpired(f"{dropped.reason} in the queue"))
