"""A per-model admission queue: priority classes, then tenants' weighted token service (VTC).

Pure Python (no Ray, FastAPI or asyncio); time comes from `clock` or each call's `now`, so the
lab drives it in simulated time. The counter is the virtual token counter of Sheng et al.,
"Fairness in Serving Large Language Models" (OSDI'24).
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(slots=True, eq=False)
class Ticket:
    """A queued request: its tenant, class (`demoted`: one step below its tenant's; `first`:
    a stopped request going on, in the class it was stopped in), estimated cost (service units)
    and deadline."""

    seq: int
    tenant: str
    priority: int
    cost: float
    enqueued_at: float
    deadline: float
    demoted: bool = False
    first: bool = False


@dataclass(frozen=True, slots=True)
class Rejected:
    """A push refused because the tenant's queue is full; retry after `retry_after_s`."""

    tenant: str
    reason: str
    retry_after_s: float

    @property
    def retry_after(self) -> int:
        """Whole seconds for an HTTP `Retry-After` header (at least 1)."""
        return max(1, math.ceil(self.retry_after_s))


@dataclass(frozen=True, slots=True)
class Dropped(Generic[T]):
    """A waiter that left the queue without being served, and why (`expired`, `cancelled`)."""

    item: T
    ticket: Ticket
    reason: str


@dataclass(slots=True)
class _Entry(Generic[T]):
    item: T
    ticket: Ticket


@dataclass(slots=True)
class _Tenant:
    counter: float = 0.0
    waiting: int = 0
    classes: dict[int, deque] = field(default_factory=dict)  # priority -> deque[_Entry]


class FairQueue(Generic[T]):
    """Admission order for one model's requests when its engines are saturated.

    Rule, at each `pop`:
    1. Drop waiters whose deadline (`max_wait_s` after their push) has passed; `take_dropped`
       hands them over with the reason `expired`.
    2. Take the most important priority class that has waiters (lower number first, as vLLM's
       `priority`), each waiter in the class it stands in (`standing`).
    3. Within it, take the tenant with the smallest virtual token counter (ties: the earliest
       waiting request); pop that tenant's oldest request of the class (FCFS per tenant).
    4. Add the request's estimated cost divided by the tenant's weight to its counter; `charge`
       later settles the difference with the real usage.

    Counters: a tenant's service is `prompt_tokens * prompt_weight + output_tokens *
    output_weight`, divided by its weight. A tenant that becomes backlogged (its first waiter)
    has its counter lifted to the smallest counter among backlogged tenants (to the last such
    minimum when none is), so time spent idle is not banked as credit.

    Bounds: at most `max_queue_per_tenant` waiters per tenant; a push beyond it returns
    `Rejected` with a Retry-After estimate: the time until the tenant's oldest waiter is
    served at its share of the measured dispatch rate, capped by that waiter's deadline.

    Demotion: with `demote_backlog`, a request pushed while its tenant already has that many
    waiters is queued one class lower (`priority + 1`; its ticket says so, and the engine
    request carries it): a tenant sending far beyond what it is served waits behind the
    others of its class instead of taking turns with them. Its waiters queued before the
    backlog grew, and its granted requests, stand one class lower too while it lasts.
    """

    def __init__(
        self,
        *,
        max_queue_per_tenant: int = 64,
        max_wait_s: float = 30.0,
        prompt_weight: float = 1.0,
        output_weight: float = 2.0,
        weights: Mapping[str, float] | None = None,
        default_weight: float = 1.0,
        rate_window_s: float = 10.0,
        demote_backlog: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_queue_per_tenant < 1 or max_wait_s <= 0 or default_weight <= 0:
            raise ValueError("max_queue_per_tenant >= 1, max_wait_s > 0, default_weight > 0")
        if demote_backlog is not None and demote_backlog < 1:
            raise ValueError("demote_backlog >= 1 (or None)")
        self.demote_backlog = demote_backlog
        self.max_queue_per_tenant = max_queue_per_tenant
        self.max_wait_s = max_wait_s
        self.prompt_weight = prompt_weight
        self.output_weight = output_weight
        self.weights = dict(weights or {})
        self.default_weight = default_weight
        self.rate_window_s = rate_window_s
        self.clock = clock
        self._tenants: dict[str, _Tenant] = {}
        self._seq = 0
        self._len = 0
        self._floor = 0.0  # the last minimum counter among backlogged tenants
        self._dispatched: deque[tuple[float, float]] = deque()  # (time, cost) within the window
        self._dropped: list[Dropped[T]] = []

    # --- what callers read
    def __len__(self) -> int:
        return self._len

    def depth(self, tenant: str) -> int:
        """Waiters of one tenant (all classes)."""
        state = self._tenants.get(tenant)
        return state.waiting if state else 0

    def depths(self) -> dict[str, int]:
        """Waiters per tenant, for tenants with any."""
        return {name: s.waiting for name, s in self._tenants.items() if s.waiting}

    def counter(self, tenant: str) -> float:
        """The tenant's virtual token counter (service units divided by its weight)."""
        state = self._tenants.get(tenant)
        return state.counter if state else 0.0

    def weight(self, tenant: str) -> float:
        """The tenant's weight (`default_weight` unless `weights` names it)."""
        return self.weights.get(tenant, self.default_weight)

    def service_units(self, prompt_tokens: int, output_tokens: int) -> float:
        """Weighted tokens of one request: `prompt * prompt_weight + output * output_weight`."""
        return prompt_tokens * self.prompt_weight + output_tokens * self.output_weight

    def dispatch_rate(self, now: float | None = None) -> float:
        """Service units popped per second over the last `rate_window_s` (0 before any)."""
        now = self.clock() if now is None else now
        self._trim_rate(now)
        if not self._dispatched:
            return 0.0
        span = max(now - self._dispatched[0][0], self.rate_window_s / 10)
        return sum(cost for _, cost in self._dispatched) / span

    # --- what callers do
    def push(
        self,
        item: T,
        tenant: str,
        priority: int = 0,
        cost_estimate: float = 0.0,
        now: float | None = None,
        first: bool = False,
    ) -> Ticket | Rejected:
        """Queue `item` for `tenant` in class `priority` (lower first), or refuse it.

        `cost_estimate` is in service units (see `service_units`): the prompt and the output
        the request may produce (its `max_tokens`). `first` puts it before the tenant's other
        waiters of its class, past the bound and with no deadline (a preempted stream waiting
        to resume)."""
        now = self.clock() if now is None else now
        state = self._tenants.setdefault(tenant, _Tenant())
        if state.waiting >= self.max_queue_per_tenant and not first:
            return Rejected(tenant, "queue-full", self._retry_after(tenant, state, now))
        demoted = not first and self.backlogged(tenant)
        if demoted:
            priority += 1
        if state.waiting == 0:
            backlogged = [s.counter for s in self._tenants.values() if s.waiting]
            state.counter = max(state.counter, min(backlogged) if backlogged else self._floor)
        self._seq += 1
        deadline = math.inf if first else now + self.max_wait_s
        ticket = Ticket(self._seq, tenant, priority, cost_estimate, now, deadline, demoted, first)
        entries = state.classes.setdefault(priority, deque())
        (entries.appendleft if first else entries.append)(_Entry(item, ticket))
        state.waiting += 1
        self._len += 1
        return ticket

    def backlogged(self, tenant: str) -> bool:
        """Whether the tenant has `demote_backlog` waiters (its next request is demoted)."""
        state = self._tenants.get(tenant)
        backlog = self.demote_backlog
        return backlog is not None and state is not None and state.waiting >= backlog

    def standing(self, ticket: Ticket, waiting: bool = False) -> int:
        """The class a request stands in, granted (when a waiter looks for one to stop,
        `preemption.victim`) or `waiting` (step 2): its ticket's, one step lower while its
        tenant is backlogged (a request granted or queued before its tenant's backlog grew is
        not spared by its age; a waiter does not count itself), unless its class already says
        so (`demoted`, `first`)."""
        state = self._tenants.get(ticket.tenant)
        backlog = self.demote_backlog
        if ticket.demoted or ticket.first or backlog is None or state is None:
            return ticket.priority
        lower = state.waiting - waiting >= backlog  # (a waiter does not count itself)
        return ticket.priority + 1 if lower else ticket.priority

    def pop(self, now: float | None = None) -> T | None:
        """The next request to dispatch (steps 1-4 above), or None when none waits."""
        now = self.clock() if now is None else now
        self.expire(now)
        chosen = self._next()
        if chosen is None:
            return None
        backlogged = [s.counter for s in self._tenants.values() if s.waiting]
        self._floor = max(self._floor, min(backlogged))
        state, priority = chosen
        entry = state.classes[priority].popleft()
        self._remove(state, priority)
        ticket = entry.ticket
        state.counter += ticket.cost / self.weight(ticket.tenant)
        self._dispatched.append((now, ticket.cost))
        self._trim_rate(now)
        return entry.item

    def peek(self, now: float | None = None) -> Ticket | None:
        """The ticket `pop` would take now (steps 1-3), left in the queue."""
        self.expire(self.clock() if now is None else now)
        chosen = self._next()
        return chosen[0].classes[chosen[1]][0].ticket if chosen else None

    def charge(
        self, tenant: str, prompt_tokens: int, output_tokens: int, reserved: float = 0.0
    ) -> None:
        """Settle real usage: add its service units, less `reserved` (the ticket's cost already
        counted at `pop`), divided by the tenant's weight. Negative differences refund."""
        state = self._tenants.setdefault(tenant, _Tenant())
        used = self.service_units(prompt_tokens, output_tokens)
        state.counter += (used - reserved) / self.weight(tenant)

    def cancel(self, ticket: Ticket) -> bool:
        """Remove a waiter (e.g. its client went away); False when it is no longer queued."""
        state = self._tenants.get(ticket.tenant)
        entries = state.classes.get(ticket.priority) if state else None
        if state is None or not entries:
            return False
        for entry in entries:
            if entry.ticket is ticket:
                entries.remove(entry)
                self._remove(state, ticket.priority)
                self._dropped.append(Dropped(entry.item, ticket, "cancelled"))
                return True
        return False

    def expire(self, now: float | None = None) -> int:
        """Drop waiters past their deadline (kept for `take_dropped`); how many were dropped.

        All waiters share `max_wait_s`, so each tenant's oldest waiter of a class expires
        first (after the resuming ones, which do not expire)."""
        now = self.clock() if now is None else now
        n = 0
        for state in self._tenants.values():
            if not state.waiting:
                continue
            for priority, entries in list(state.classes.items()):
                skip = 0
                while skip < len(entries) and entries[skip].ticket.deadline == math.inf:
                    skip += 1
                while skip < len(entries) and entries[skip].ticket.deadline <= now:
                    entry = entries[skip]
                    del entries[skip]
                    self._remove(state, priority)
                    self._dropped.append(Dropped(entry.item, entry.ticket, "expired"))
                    n += 1
        return n

    def take_dropped(self) -> list[Dropped[T]]:
        """Waiters dropped since the last call (expired or cancelled), oldest first."""
        out, self._dropped = self._dropped, []
        return out

    def __iter__(self) -> Iterator[Ticket]:
        """The queued tickets, tenant by tenant (no particular order)."""
        for state in self._tenants.values():
            for entries in state.classes.values():
                for entry in entries:
                    yield entry.ticket

    # --- internals
    def _next(self) -> tuple[_Tenant, int] | None:
        """The tenant and class of the next request (steps 2-3), or None."""
        best: tuple[int, float, int] | None = None
        chosen: tuple[_Tenant, int] | None = None
        for state in self._tenants.values():
            if not state.waiting:
                continue
            for priority, entries in state.classes.items():
                if entries:
                    ticket = entries[0].ticket
                    key = (self.standing(ticket, waiting=True), state.counter, ticket.seq)
                    if best is None or key < best:
                        best, chosen = key, (state, priority)
        return chosen

    def _remove(self, state: _Tenant, priority: int) -> None:
        state.waiting -= 1
        self._len -= 1
        if not state.classes[priority]:
            del state.classes[priority]

    def _trim_rate(self, now: float) -> None:
        while self._dispatched and self._dispatched[0][0] < now - self.rate_window_s:
            self._dispatched.popleft()

    def _retry_after(self, tenant: str, state: _Tenant, now: float) -> float:
        """Seconds until the tenant's oldest waiter leaves: served at the tenant's weighted
        share of the measured dispatch rate among tenants waiting in its class, and never
        later than its deadline."""
        head = min((e[0].ticket for e in state.classes.values() if e), key=lambda t: t.seq)
        until_deadline = max(0.0, head.deadline - now)
        rate = self.dispatch_rate(now)
        if rate <= 0:
            return until_deadline
        peers = sum(
            self.weight(name)
            for name, s in self._tenants.items()
            if any(p <= head.priority for p in s.classes)
        )
        share = self.weight(tenant) / peers if peers else 1.0
        return min(until_deadline, head.cost / (rate * share))
