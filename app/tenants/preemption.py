"""Which running request to stop when every engine slot is held and a more important one waits.

Pure Python: the admission gate (`app.tenants.gate`) and the lab's simulated gateway
(`app.lab.tenants`) call it. A stopped request keeps the tokens it produced and waits first in
its tenant's queue (`FairQueue.push(first=True)`) to go on when a slot is free.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Generic, TypeVar

K = TypeVar("K")


@dataclass(frozen=True, slots=True)
class Holder(Generic[K]):
    """A request holding a slot that may be stopped: `priority` is the class it stands in
    (`FairQueue.standing`: a backlogged tenant's one step lower), `granted` when (monotonic
    seconds), `tenant` whose, `answering` whether its engine has begun to answer (its prefill
    is done), `prefills_beside` how many requests on its engine (itself included) are in their
    prefill: the waiter, placed on the engine the stopped one frees, waits for them; `stops`
    how many times it was stopped before."""

    key: K
    priority: int
    granted: float
    tenant: str = ""
    answering: bool = False
    prefills_beside: int = 0
    stops: int = 0


def least_lost(holder: Holder) -> tuple[bool, int, float]:
    """One whose engine has begun to answer first, then the one stopped the fewest times
    before, then the most recently granted. Stopping a request in its prefill throws that
    prefill away (its continuation prefills it anew), and delays its first token; one that
    answers keeps its first token, and its prompt is in the engine's prefix cache for its
    continuation. A stopped request goes on first in its tenant's queue and is then the most
    recently granted: without the count, the same few requests would be stopped again and
    again (each time prefilling anew, their clients paused) while the tenant's others ran."""
    return not holder.answering, holder.stops, -holder.granted


def soonest_served(holder: Holder) -> tuple[int, bool, int, float]:
    """The default order within a class: the one on the engine with the fewest requests in
    their prefill first, then `least_lost`. An engine computes a step's prefills whole before
    it takes a new request, so a waiter placed beside a prefill waits for it (on a CPU, for
    hundreds of ms)."""
    return holder.prefills_beside, *least_lost(holder)


def victim(
    waiter_priority: int,
    holders: Iterable[Holder[K]],
    order: Callable[[Holder[K]], float | tuple] = soonest_served,
    waiter_tenant: str | None = None,
) -> Holder[K] | None:
    """The request to stop so that a waiter of class `waiter_priority` (of `waiter_tenant`)
    gets its slot, or None:

    1. Only requests of a less important class than the waiter's (a larger `priority`) may be
       stopped: a class never stops its own, so requests of one class never churn.
    2. Never a request of the waiter's own tenant (it would only trade one of its requests
       for another, and lose the stopped one's work).
    3. The least important class loses first.
    4. Within it, the first in `order` (by default `soonest_served`: the one on the engine
       with the fewest requests in their prefill, then one already answering, then the one
       stopped the fewest times before, then the most recently granted).
    """
    best: Holder[K] | None = None
    best_key: tuple | None = None
    for holder in holders:
        if holder.priority <= waiter_priority or holder.tenant == waiter_tenant:
            continue
        key = (-holder.priority, order(holder))  # each holder's order read once
        if best_key is None or key < best_key:
            best, best_key = holder, key
    return best
