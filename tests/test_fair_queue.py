"""The fair admission queue: priority classes, weighted VTC, lift, bounds, expiry, charges."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Callable

import pytest

from app.tenants import (
    AdmissionGate,
    FairQueue,
    Holder,
    QueueFull,
    Rejected,
    Ticket,
    WaitExpired,
    victim,
)
from app.tenants.gate import Slot
from app.tenants.preemption import least_lost


def _drain(q: FairQueue, now: float = 0.0) -> list:
    out = []
    while (item := q.pop(now)) is not None:
        out.append(item)
    return out


def test_lower_priority_number_goes_first_whatever_the_counters():
    q: FairQueue[str] = FairQueue()
    q.push("batch-1", "b", priority=20, cost_estimate=1, now=0)
    q.push("std-1", "s", priority=10, cost_estimate=1, now=0)
    q.charge("i", 10_000, 0)  # the interactive tenant has had much more service
    q.push("int-1", "i", priority=0, cost_estimate=1, now=0)
    q.push("int-2", "i", priority=0, cost_estimate=1, now=0)
    assert _drain(q) == ["int-1", "int-2", "std-1", "batch-1"]


def test_weighted_token_service_is_shared_by_weight():
    q: FairQueue[str] = FairQueue(weights={"gold": 2.0}, max_queue_per_tenant=1000)
    for i in range(300):
        q.push(f"gold-{i}", "gold", 10, 100, now=0)
        q.push(f"free-{i}", "free", 10, 100, now=0)
    served = Counter(q.pop(0).split("-")[0] for _ in range(300))
    assert abs(served["gold"] - 200) <= 1 and abs(served["free"] - 100) <= 1
    assert abs(q.counter("gold") - q.counter("free")) <= 100


def test_service_counts_tokens_not_requests():
    q: FairQueue[str] = FairQueue(max_queue_per_tenant=1000)
    for i in range(100):
        q.push(f"big-{i}", "big", 10, q.service_units(900, 50), now=0)  # 1000 units
        q.push(f"small-{i}", "small", 10, q.service_units(50, 25), now=0)  # 100 units
    served = Counter(q.pop(0).split("-")[0] for _ in range(55))
    assert served["small"] == 50 and served["big"] == 5  # ten small ones per big one


def test_new_tenant_is_lifted_and_cannot_bank_idle_time():
    q: FairQueue[str] = FairQueue(max_queue_per_tenant=1000)
    for i in range(50):
        q.push(f"a-{i}", "a", 10, 100, now=0)
    for _ in range(40):
        q.pop(0)  # a alone: its counter reaches 4000
    assert q.counter("a") == 4000 and q.counter("b") == 0
    for i in range(10):
        q.push(f"b-{i}", "b", 10, 100, now=1)
    assert q.counter("b") == 4000  # lifted to the backlogged minimum, not left at 0
    order = [q.pop(1) for _ in range(6)]
    assert [x[0] for x in order] == ["a", "b", "a", "b", "a", "b"]  # turns, not a run of b's


def test_lift_uses_the_last_minimum_when_nobody_waits():
    q: FairQueue[str] = FairQueue()
    q.push("a-0", "a", 10, 500, now=0)
    q.pop(0)
    q.push("b-0", "b", 10, 500, now=1)  # nobody waits: lifted to the minimum seen at the last pop
    assert q.counter("b") == 0.0
    q.push("a-1", "a", 10, 500, now=1)
    q.push("a-2", "a", 10, 500, now=1)
    q.pop(1)  # b (counter 0) goes; the minimum among waiters was 0
    q.push("c-0", "c", 10, 500, now=2)
    assert q.counter("c") == min(q.counter("a"), q.counter("b"))


def test_full_tenant_queue_is_rejected_with_retry_after():
    q: FairQueue[str] = FairQueue(max_queue_per_tenant=2, max_wait_s=20)
    assert isinstance(q.push("a-0", "a", 10, 300, now=0), Ticket)
    assert isinstance(q.push("a-1", "a", 10, 300, now=0), Ticket)
    rejected = q.push("a-2", "a", 10, 300, now=5)
    assert isinstance(rejected, Rejected) and rejected.reason == "queue-full"
    assert rejected.retry_after_s == pytest.approx(15.0)  # no rate measured: the head's deadline
    assert rejected.retry_after == 15
    assert isinstance(q.push("b-0", "b", 10, 300, now=5), Ticket)  # other tenants unaffected
    assert q.depth("a") == 2 and q.depths() == {"a": 2, "b": 1} and len(q) == 3


def test_retry_after_follows_the_measured_rate_and_the_tenants_share():
    q: FairQueue[str] = FairQueue(max_queue_per_tenant=1, max_wait_s=60, rate_window_s=10)
    for t in range(10):  # 1000 units dispatched per second for 10 s
        q.push(f"x-{t}", "x", 10, 1000, now=t)
        assert q.pop(now=t) == f"x-{t}"
    assert q.dispatch_rate(now=10) == pytest.approx(1000, rel=0.15)
    q.push("a-0", "a", 10, 500, now=10)
    q.push("b-0", "b", 10, 500, now=10)
    rejected = q.push("a-1", "a", 10, 500, now=10)
    assert isinstance(rejected, Rejected)
    # the head (500 units) at a's half of the rate (a and b wait): about one second
    assert rejected.retry_after_s == pytest.approx(1.0, rel=0.15)
    assert rejected.retry_after == 1


def test_expired_waiters_are_dropped_with_a_reason_and_not_charged():
    q: FairQueue[str] = FairQueue(max_wait_s=5)
    q.push("old", "a", 10, 100, now=0)
    q.push("new", "b", 10, 100, now=4)
    assert q.pop(now=6) == "new"
    dropped = q.take_dropped()
    assert [(d.item, d.reason) for d in dropped] == [("old", "expired")]
    assert q.counter("a") == 0 and q.take_dropped() == []
    assert len(q) == 0 and q.pop(now=7) is None


def test_charge_settles_the_reservation():
    q: FairQueue[str] = FairQueue(weights={"a": 2.0})
    ticket = q.push("a-0", "a", 10, 1000, now=0)
    assert isinstance(ticket, Ticket)
    q.pop(0)
    assert q.counter("a") == 500  # 1000 reserved units / weight 2
    q.charge("a", prompt_tokens=200, output_tokens=100, reserved=ticket.cost)  # used 400
    assert q.counter("a") == pytest.approx(200)  # (1000 + (400 - 1000)) / 2
    q.charge("b", prompt_tokens=10, output_tokens=5)  # no reservation: all of it
    assert q.counter("b") == 20


@pytest.mark.parametrize("refund", [False, True])
def test_a_refund_moves_the_tenant_ahead(refund):
    q: FairQueue[str] = FairQueue()
    ta = q.push("a-0", "a", 10, 1000, now=0)
    q.push("a-1", "a", 10, 1000, now=0)
    q.push("b-0", "b", 10, 600, now=0)
    q.push("b-1", "b", 10, 600, now=0)
    assert isinstance(ta, Ticket)
    assert [q.pop(0), q.pop(0)] == ["a-0", "b-0"]  # counters: a 1000, b 600
    if refund:
        q.charge("a", 50, 0, reserved=ta.cost)  # a used 50 of the 1000 it reserved
    assert q.pop(0) == ("a-1" if refund else "b-1")


def test_cancel_removes_a_waiter():
    q: FairQueue[str] = FairQueue()
    t0 = q.push("a-0", "a", 10, 1, now=0)
    q.push("a-1", "a", 10, 1, now=0)
    assert isinstance(t0, Ticket)
    assert q.cancel(t0) and not q.cancel(t0)
    assert [d.reason for d in q.take_dropped()] == ["cancelled"]
    assert _drain(q) == ["a-1"]


def test_bad_bounds_are_refused():
    with pytest.raises(ValueError):
        FairQueue(max_queue_per_tenant=0)
    with pytest.raises(ValueError):
        FairQueue(max_wait_s=0)


# --- the asyncio gate


def test_gate_grants_slots_in_fair_order_and_frees_them():
    async def main() -> list[str]:
        gate = AdmissionGate(1, FairQueue(weights={"gold": 2.0}, max_queue_per_tenant=100))
        order: list[str] = []

        async def request(tenant: str, i: int) -> None:
            async with gate.admit(tenant, 10, 100) as slot:
                order.append(f"{tenant}-{i}")
                await asyncio.sleep(0)
                slot.settle(100, 0)

        async with gate.admit("holder", 10, 100):  # holds the only slot while the rest queue
            tasks = [asyncio.create_task(request(t, i)) for i in range(4) for t in ("gold", "free")]
            await asyncio.sleep(0)
            assert len(gate.queue) == 8 and gate.in_flight == 1
        await asyncio.gather(*tasks)
        assert gate.in_flight == 0 and len(gate.queue) == 0
        return order

    order = asyncio.run(main())
    assert [o.split("-")[0] for o in order[:6]] == ["gold", "free", "gold", "free", "gold", "gold"]


def test_gate_refuses_a_full_queue_and_expires_waiters():
    async def main() -> None:
        gate = AdmissionGate(1, FairQueue(max_queue_per_tenant=1, max_wait_s=0.05))
        async with gate.admit("a", 10, 1):
            waiter = asyncio.create_task(_enter(gate, "b"))
            await asyncio.sleep(0)
            with pytest.raises(QueueFull) as full:
                async with gate.admit("b", 10, 1):
                    pass
            assert full.value.rejected.retry_after >= 1
            with pytest.raises(WaitExpired):
                await waiter
            assert len(gate.queue) == 0
        assert gate.in_flight == 0

    asyncio.run(main())


def test_gate_cancelled_waiter_leaves_the_queue():
    async def main() -> None:
        gate = AdmissionGate(1)
        async with gate.admit("a", 10, 1):
            waiter = asyncio.create_task(_enter(gate, "b"))
            await asyncio.sleep(0)
            assert len(gate.queue) == 1
            waiter.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiter
            assert len(gate.queue) == 0
        assert gate.in_flight == 0

    asyncio.run(main())


async def _enter(gate: AdmissionGate, tenant: str) -> None:
    async with gate.admit(tenant, 10, 1):
        pass


# --- demotion, resuming waiters, preemption


def test_a_tenant_with_a_deep_backlog_is_queued_one_class_lower():
    q: FairQueue[str] = FairQueue(demote_backlog=2)
    tickets = [q.push(f"n{i}", "noisy", 10, 1, now=0) for i in range(4)]
    assert [t.priority for t in tickets] == [10, 10, 11, 11]  # from its third waiter on
    q.push("a1", "a", 10, 1, now=0)  # its counter is lifted to noisy's: level
    # noisy's waiters queued before its backlog grew (n0, n1) stand one class lower too
    assert _drain(q) == ["a1", "n0", "n1", "n2", "n3"]
    assert q.push("n4", "noisy", 10, 1, now=0).priority == 10  # its backlog is gone
    with pytest.raises(ValueError):
        FairQueue(demote_backlog=0)


def test_a_resuming_waiter_goes_first_past_the_bound_and_never_expires():
    q: FairQueue[str] = FairQueue(max_queue_per_tenant=1, max_wait_s=1.0)
    q.push("old", "t", 10, 1, now=0)
    assert isinstance(q.push("more", "t", 10, 1, now=0), Rejected)
    resumed = q.push("resumed", "t", 10, 0, now=0, first=True)
    assert isinstance(resumed, Ticket) and resumed.deadline == float("inf")
    assert q.peek(now=0) is resumed and len(q) == 2  # peek takes nothing
    assert q.expire(now=5) == 1  # "old" expires behind the resuming one
    assert [d.item for d in q.take_dropped()] == ["old"]
    assert _drain(q, now=5) == ["resumed"]


def test_peek_names_what_pop_takes():
    q: FairQueue[str] = FairQueue()
    assert q.peek(now=0) is None
    q.push("b", "b", 20, 1, now=0)
    std = q.push("s", "s", 10, 1, now=0)
    assert q.peek(now=0) is std and q.pop(now=0) == "s"


def test_the_victim_is_of_a_less_important_class_the_least_important_first():
    holders = [Holder("std-old", 10, 1.0), Holder("batch-old", 20, 1.0),
               Holder("batch-new", 20, 2.0), Holder("int", 0, 3.0)]  # fmt: skip
    assert victim(0, holders).key == "batch-new"  # the least important, most recent
    assert victim(10, holders).key == "batch-new"
    assert victim(20, holders) is None  # a class never stops its own
    assert victim(10, holders[:1]) is None
    assert victim(0, holders, order=lambda h: h.granted).key == "batch-old"


def test_within_a_class_a_holder_already_answering_is_stopped_before_one_in_its_prefill():
    holders = [Holder("answering", 20, 1.0, answering=True), Holder("prefill", 20, 2.0),
               Holder("std-answering", 10, 3.0, answering=True)]  # fmt: skip
    assert victim(0, holders).key == "answering"  # though granted before the other
    assert victim(0, holders[1:]).key == "prefill"  # the less important class still first
    assert victim(0, holders[:2], order=lambda h: -h.granted).key == "prefill"


def test_within_a_class_the_holder_beside_the_fewest_prefills_is_stopped_first():
    holders = [Holder("old-alone", 20, 1.0, answering=True, prefills_beside=0),
               Holder("new-beside", 20, 2.0, answering=True, prefills_beside=1),
               Holder("std-alone", 10, 3.0, answering=True)]  # fmt: skip
    assert victim(0, holders).key == "old-alone"  # though granted before the other
    assert victim(0, holders[1:]).key == "new-beside"  # the less important class still first
    assert victim(0, holders[:2], order=least_lost).key == "new-beside"


def test_within_a_class_the_holder_stopped_the_fewest_times_is_stopped_first():
    holders = [Holder("old", 20, 1.0, answering=True),
               Holder("stopped-once", 20, 2.0, answering=True, stops=1)]  # fmt: skip
    assert victim(0, holders).key == "old"  # though granted before the other
    assert victim(0, holders, order=lambda h: -h.granted).key == "stopped-once"
    beside = Holder("beside-a-prefill", 20, 0.5, answering=True, prefills_beside=1)
    assert victim(0, [*holders[1:], beside]).key == "stopped-once"  # the engine comes first


def _stopped_for(waiter: str, holders: list[tuple[str, int, str, bool, bool]]) -> list[int]:
    """Holders `(tenant, priority, place, answering, stoppable)` take every slot of a gate, in
    this order, and say where their request is (`Slot.placed`); a `waiter` (class 10) comes:
    the indexes of the holders it stops (each one stopped gives its slot up and waits again)."""

    async def main() -> list[int]:
        gate = AdmissionGate(len(holders), FairQueue(), preempt=True)
        stopped: list[tuple[int, Slot]] = []
        async with contextlib.AsyncExitStack() as held:
            for i, (tenant, priority, place, answering, stoppable) in enumerate(holders):
                slot = await held.enter_async_context(gate.admit(tenant, priority, 1))
                slot.placed(place, answering=answering)
                if stoppable:
                    slot.stoppable(lambda i=i, slot=slot: stopped.append((i, slot)) or True)
            waiter_task = asyncio.create_task(_enter(gate, waiter))
            await asyncio.sleep(0.01)
            assert gate.stopping == len(stopped) == 1
            ((_, slot),) = stopped
            assert slot.place is not None
            await slot.resume()  # the waiter takes its slot, then it has one again
            assert slot.place is None and not slot.answering  # on no engine until it goes on
        await waiter_task
        return [i for i, _ in stopped]

    return asyncio.run(main())


def test_gate_stops_a_holder_that_answers_before_a_later_one_in_its_prefill():
    older, newer = ("batch", 20, "r1", True, True), ("batch", 20, "r1", False, True)
    assert _stopped_for("chat", [older, newer]) == [0]


def test_gate_stops_a_holder_on_an_engine_without_a_prefill_before_a_later_one_beside_one():
    """The waiter goes where the stopped one was, and would wait there for the engine's
    prefill (here a request of a class that cannot be stopped for the waiter)."""
    old, new = ("batch", 20, "r2", True, True), ("batch", 20, "r1", True, True)
    prefilling = ("chat", 0, "r1", False, False)
    assert _stopped_for("team", [old, new, prefilling]) == [0]  # not the most recent
    assert _stopped_for("team", [old, new]) == [1]  # without that prefill: the most recent


def test_gate_stops_another_holder_before_one_it_stopped_and_granted_again():
    """A stopped request goes on first in its tenant's queue, and is then the most recently
    granted: the next waiter stops another one of that class, not it again."""

    async def main() -> list[str]:
        gate = AdmissionGate(2, FairQueue(), preempt=True)
        stopped: list[str] = []

        def offer(name: str, slot: Slot) -> None:
            slot.placed("r1", answering=True)
            slot.stoppable(lambda: stopped.append(name) or True)

        async with gate.admit("batch", 20, 1) as old, gate.admit("batch", 20, 1) as new:
            offer("old", old)
            offer("new", new)
            first = asyncio.create_task(_enter(gate, "chat"))
            await asyncio.sleep(0.01)
            assert stopped == ["new"]  # the most recently granted
            await new.resume()  # the waiter's turn came and went: it has a slot again
            await first
            offer("new", new)
            second = asyncio.create_task(_enter(gate, "team"))
            await asyncio.sleep(0.01)
            await {"old": old, "new": new}[stopped[-1]].resume()
            await second
        return stopped

    assert asyncio.run(main()) == ["new", "old"]


def test_a_granted_request_stands_one_class_lower_while_its_tenant_is_backlogged():
    q: FairQueue[str] = FairQueue(demote_backlog=2)
    granted = q.push("n0", "noisy", 10, 1, now=0)
    assert q.pop(now=0) == "n0" and q.standing(granted) == 10  # nothing waits behind it
    waiting = [q.push(f"n{i}", "noisy", 10, 1, now=0) for i in (1, 2, 3)]
    assert q.backlogged("noisy") and not q.backlogged("other")
    assert q.standing(granted) == 11  # granted before its tenant's backlog grew
    assert waiting[2].demoted and q.standing(waiting[2]) == 11  # demoted once, not twice
    assert q.standing(waiting[0]) == 11 and not waiting[0].demoted
    _drain(q)
    assert q.standing(granted) == 10 and q.standing(waiting[2]) == 11


def test_a_waiter_does_not_count_itself_in_its_tenants_backlog():
    q: FairQueue[str] = FairQueue(demote_backlog=1)
    first = q.push("a1", "a", 10, 1, now=0)
    assert q.standing(first, waiting=True) == 10  # alone in its queue
    assert q.standing(Ticket(0, "a", 10, 1, 0, 0)) == 11  # a granted one: its tenant waits
    second = q.push("a2", "a", 10, 1, now=0)
    assert second.demoted and q.standing(second, waiting=True) == 11
    assert q.standing(first, waiting=True) == 11  # one other waiter now


def _noisy_and_others(gate: AdmissionGate, order: list[str]) -> tuple[Callable, Callable]:
    """A `noisy` request of class 10 that holds its slot and offers it (it goes on once
    stopped and granted again), and other requests of class 10, each noting when it runs."""
    stopped = asyncio.Event()

    async def noisy() -> None:
        async with gate.admit("noisy", 10, 1) as slot:
            slot.stoppable(lambda: (stopped.set(), True)[1])
            await stopped.wait()
            order.append("noisy stopped")
            await slot.resume()  # in the class it stood in: behind the waiter that stopped it
            order.append("noisy goes on")

    async def other(tenant: str) -> None:
        async with gate.admit(tenant, 10, 1):
            order.append(f"{tenant} runs")

    return noisy, other


def test_gate_a_waiter_level_with_a_backlogged_tenants_older_waiters_stops_its_stream():
    """The other tenant's counter is lifted to the backlogged one's (level), and that one's
    waiters are older: they stand one class lower, so the other's waiter is the queue's next
    and stops one of its streams at once, instead of waiting for one to end."""

    async def main() -> list[str]:
        gate = AdmissionGate(1, FairQueue(demote_backlog=2, max_wait_s=2), preempt=True)
        order: list[str] = []
        noisy, other = _noisy_and_others(gate, order)
        tasks = [asyncio.create_task(noisy())]
        await asyncio.sleep(0.01)
        tasks += [asyncio.create_task(other("noisy")) for _ in range(3)]  # backlogged at 2
        await asyncio.sleep(0.01)
        assert gate.preempted == 0  # its own waiters never stop it
        assert gate.queue.counter("noisy") == 1  # the holder's cost
        tasks.append(asyncio.create_task(other("team")))
        await asyncio.gather(*tasks)
        assert gate.queue.counter("team") == 2  # lifted to noisy's, plus its own cost
        return order

    assert asyncio.run(main())[:2] == ["noisy stopped", "team runs"]


def test_the_victim_is_never_of_the_waiters_own_tenant():
    holders = [Holder("mine", 11, 2.0, "noisy"), Holder("theirs", 11, 1.0, "team")]
    assert victim(10, holders, waiter_tenant="noisy").key == "theirs"
    assert victim(10, holders[:1], waiter_tenant="noisy") is None
    assert victim(10, holders).key == "mine"  # (no tenant given: the most recent)


def test_gate_stops_a_backlogged_tenants_request_of_the_waiters_class():
    async def main() -> list[str]:
        gate = AdmissionGate(1, FairQueue(demote_backlog=1), preempt=True)
        order: list[str] = []
        noisy, other = _noisy_and_others(gate, order)
        holder = asyncio.create_task(noisy())
        await asyncio.sleep(0.01)
        team = asyncio.create_task(other("team"))
        await asyncio.sleep(0.01)
        assert gate.preempted == 0  # of its class, and noisy is not backlogged
        backlog = asyncio.create_task(other("noisy"))  # now it is: its holder stands lower
        await asyncio.gather(holder, team, backlog)
        assert gate.preempted == 1 and gate.in_flight == 0
        return order

    # the stopped one waits in class 11, behind its tenant's own waiter (older, also 11 now)
    assert asyncio.run(main()) == ["noisy stopped", "team runs", "noisy runs", "noisy goes on"]


def test_gate_stops_a_less_important_holder_for_a_waiter_which_goes_on_after():
    async def main() -> list[str]:
        gate = AdmissionGate(1, FairQueue(), preempt=True)
        order: list[str] = []
        stopped = asyncio.Event()

        async def batch() -> None:
            async with gate.admit("batch", 20, 10) as slot:
                order.append("batch starts")
                slot.stoppable(lambda: (stopped.set(), True)[1])
                await stopped.wait()
                order.append("batch stopped")
                await slot.resume()  # waits until the interactive request is done
                order.append("batch goes on")
                slot.settle(5, 5)

        async def interactive() -> None:
            async with gate.admit("chat", 0, 1):
                order.append("chat runs")
                await asyncio.sleep(0.01)

        holder = asyncio.create_task(batch())
        await asyncio.sleep(0.01)
        await asyncio.gather(holder, interactive())
        assert gate.in_flight == 0 and not gate.holding and gate.stopping == 0
        assert gate.preempted == 1
        assert gate.queue.counter("batch") == 5 + 5 * 2  # settled once, against the first grant
        return order

    assert asyncio.run(main()) == ["batch starts", "batch stopped", "chat runs", "batch goes on"]


def test_gate_leaves_holders_of_the_same_class_and_those_that_cannot_stop():
    async def main() -> None:
        gate = AdmissionGate(2, FairQueue(), preempt=True)
        refused = []
        async with gate.admit("a", 10, 1) as same, gate.admit("b", 20, 1) as unable:
            same.stoppable(lambda: refused.append("same") or True)
            unable.stoppable(lambda: refused.append("unable") or False)  # e.g. it cannot go on
            waiter = asyncio.create_task(_enter(gate, "c"))
            await asyncio.sleep(0.01)
            assert refused == ["unable"] and gate.stopping == 0 and len(gate.queue) == 1
            assert unable.stop is None  # asked once
        await waiter
        assert gate.in_flight == 0

    asyncio.run(main())


def test_gate_a_stopped_holder_cancelled_while_waiting_gives_nothing_back_twice():
    async def main() -> None:
        gate = AdmissionGate(1, FairQueue(), preempt=True)

        async def batch() -> None:
            async with gate.admit("batch", 20, 1) as slot:
                slot.stoppable(lambda: True)
                await asyncio.sleep(0.01)
                await slot.resume()

        holder = asyncio.create_task(batch())
        await asyncio.sleep(0)
        async with gate.admit("chat", 0, 1):
            await asyncio.sleep(0.02)
            assert len(gate.queue) == 1  # the stopped one waits to go on
            holder.cancel()
            with pytest.raises(asyncio.CancelledError):
                await holder
            assert len(gate.queue) == 0 and gate.in_flight == 1
        assert gate.in_flight == 0 and gate.stopping == 0

    asyncio.run(main())
