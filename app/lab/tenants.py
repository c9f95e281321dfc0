"""The noisy-neighbour lab: admission rules for tenants on simulated replicas (a simulator).

Each tenant's share is `share_of_capacity` of the replicas' measured capacity, split by weight;
tenants send at their share (Poisson), one at `TenantSpec.multiple` times it. Each rule runs
twice on the same requests: with the noisy tenant and without it ("alone"). Figures per rule:
the other tenants' worst TTFT p99 ratio (with / alone), their requests refused or expired,
Jain's index of each tenant's weighted token service over its max-min fair allocation, and the
noisy tenant's throughput.

Rules: `fcfs` (today: no admission queue, the engines serve first come first served), `fair`
(ours: `app.tenants.FairQueue`), and peers' documented rules re-implemented (no code copied):
`llmd-round-robin` (llm-d flow control), `sglang-priority` (SGLang's priority scheduling with
its gateway's bounded queue) and `aibrix-vtc-basic` (a router: `app.lab.peers.AibrixVtcBasic`).
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from app.lab.figures import percentile
from app.lab.peers import AibrixVtcBasic, VtcTokenTracker
from app.lab.run import lab_policy
from app.lab.simulator import Admission, ReplayResult, Running, SimSettings, replay
from app.lab.trace import TraceRequest
from app.routing import approx_tokens
from app.tenants import FairQueue, Holder, Rejected, Ticket, victim

PROMPT_WEIGHT, OUTPUT_WEIGHT = 1.0, 2.0  # service units per prompt and output token (VTC)


@dataclass(frozen=True, slots=True)
class TenantSpec:
    """A tenant of the scenario: weight, priority class (lower first), demand / share."""

    name: str
    weight: float = 1.0
    priority: int = 10
    multiple: float = 1.0


DEFAULT_TENANTS = (
    TenantSpec("interactive", 1.0, 0),
    TenantSpec("premium", 2.0, 10),
    TenantSpec("team-a", 1.0, 10),
    TenantSpec("team-b", 1.0, 10),
    TenantSpec("noisy", 1.0, 10, multiple=10.0),
)
NOISY = "noisy"
# The engines schedule by priority (with tenants the config starts them so).
SCENARIO_SETTINGS = SimSettings(max_concurrency=8, priority_scheduling=True)
DEMOTE_BACKLOG = 16  # the config's default `admission.demote_backlog`


@dataclass(frozen=True, slots=True)
class Scenario:
    """The scenario's shape: tenants, simulated replicas, length and request sizes (tokens)."""

    tenants: tuple[TenantSpec, ...] = DEFAULT_TENANTS
    replicas: int = 4
    settings: SimSettings = SCENARIO_SETTINGS
    duration_s: float = 60.0
    warmup_s: float = 10.0
    prompt_tokens: tuple[int, int] = (128, 768)
    output_tokens: tuple[int, int] = (32, 192)
    share_of_capacity: float = 0.8
    max_queue_per_tenant: int = 64
    max_wait_s: float = 30.0
    seed: int = 0


def prompt_tokens(request: TraceRequest) -> int:
    """The request's prompt length in tokens (its token ids, a blocks line's count, else the
    text's estimate)."""
    if request.prompt_tokens is not None:
        return request.prompt_tokens
    if request.tokens is not None:
        return len(request.tokens)
    return approx_tokens(request.prompt or "")


def service_units(request: TraceRequest) -> float:
    """Weighted tokens of a request: prompt x 1 + output (`max_tokens`) x 2."""
    return prompt_tokens(request) * PROMPT_WEIGHT + request.max_tokens * OUTPUT_WEIGHT


def _requests(
    sc: Scenario, rates: dict[str, float], duration: float, seed: int
) -> list[TraceRequest]:
    """Poisson arrivals per tenant at `rates` (requests/s); random token prompts (no reuse)."""
    rng = np.random.default_rng(seed)
    out: list[TraceRequest] = []
    for spec in sc.tenants:
        rate = rates.get(spec.name, 0.0)
        t = rng.exponential(1 / rate) if rate > 0 else math.inf
        while t < duration:
            n = int(rng.integers(sc.prompt_tokens[0], sc.prompt_tokens[1] + 1))
            out.append(
                TraceRequest(
                    float(t),
                    "default",
                    tokens=rng.integers(0, 50_000, n).tolist(),
                    session=spec.name,
                    max_tokens=int(rng.integers(sc.output_tokens[0], sc.output_tokens[1] + 1)),
                    tenant=spec.name,
                    priority=spec.priority,
                )
            )
            t += rng.exponential(1 / rate)
    out.sort(key=lambda r: r.t)
    return out


def _served_units(
    result: ReplayResult, requests: Sequence[TraceRequest], t0: float, t1: float
) -> dict[str, float]:
    """Service units per tenant of requests whose first token came in [t0, t1)."""
    units: dict[str, float] = {}
    for job, r in zip(result.jobs, requests, strict=True):
        if job.replica >= 0 and t0 <= job.arrival + job.ttft < t1:
            units[r.tenant or ""] = units.get(r.tenant or "", 0.0) + service_units(r)
    return units


def measure_capacity(sc: Scenario) -> float:
    """Service units per second the simulated replicas deliver when flooded (FCFS)."""
    slots = sc.replicas * sc.settings.max_concurrency
    hold = (
        sc.settings.prefill_overhead
        + sc.settings.prefill_cost * sum(sc.prompt_tokens) / 2
        + sc.settings.decode_cost * sum(sc.output_tokens) / 2
    )
    flood_rps = 3 * slots / hold  # three times what the slots can hold
    length = 30.0
    reqs = _requests(sc, {sc.tenants[0].name: flood_rps}, length, sc.seed + 1)
    result = replay(reqs, lab_policy("scored", sc.settings), sc.replicas, sc.settings)
    served = _served_units(result, reqs, length / 3, length)
    return sum(served.values()) / (length * 2 / 3)


# --- admission rules -------------------------------------------------------------------------


class FairAdmission:
    """Ours, as the ingress's admission gate runs it (`app.tenants`): `FairQueue` (priority
    classes, then VTC within a class, bounded per tenant) with demotion (`demote_backlog`: a
    tenant with that many waiters queues one class lower, and its engine requests carry that
    priority) and preemption (`preempt`: with every slot held, the queue's next waiter stops a
    request of a less important class, `app.tenants.preemption.victim`; the stopped one keeps
    its tokens and waits first in its tenant's queue). The waiter takes the stopped request's
    replica, so among equals the one whose replica has the least prefill work ahead of the
    waiter goes (the ingress counts requests in their prefill: `preemption.soonest_served`),
    then the one stopped the fewest times before, then the most recently dispatched."""

    gated = True

    def __init__(
        self,
        sc: Scenario,
        requests: Sequence[TraceRequest],
        *,
        demote_backlog: int | None = DEMOTE_BACKLOG,
        preempt: bool = True,
    ) -> None:
        self.name = "fair" if preempt and demote_backlog else "fair-queue"
        self.queue: FairQueue[int] = FairQueue(
            max_queue_per_tenant=sc.max_queue_per_tenant,
            max_wait_s=sc.max_wait_s,
            prompt_weight=PROMPT_WEIGHT,
            output_weight=OUTPUT_WEIGHT,
            weights={t.name: t.weight for t in sc.tenants},
            demote_backlog=demote_backlog,
        )
        self.requests = requests
        self.preempts = preempt
        self.tickets: dict[int, Ticket] = {}
        self.reserved: dict[int, float] = {}
        self.refused: dict[str, int] = {}
        self.preempted: dict[str, int] = {}
        self.stops: dict[int, int] = {}  # request index -> times stopped

    def arrive(self, index: int, request: TraceRequest, now: float) -> bool:
        tenant = request.tenant or ""
        cost = service_units(request)
        ticket = self.queue.push(index, tenant, request.priority, cost, now)
        if isinstance(ticket, Rejected):
            self.refused[tenant] = self.refused.get(tenant, 0) + 1
            return False
        self.tickets[index] = ticket
        self.reserved[index] = cost
        return True

    def next(self, now: float, free_slots: int) -> int | None:
        if free_slots <= 0:
            self.queue.expire(now)
            return None
        return self.queue.pop(now)

    def engine_priority(self, index: int) -> int:
        return self.tickets[index].priority

    def preempt(
        self, now: float, running: Sequence[Running], backlog: Callable[[int, int], int]
    ) -> list[int]:
        head = self.queue.peek(now) if self.preempts else None
        if head is None:
            return []
        tickets, standing = self.tickets, self.queue.standing
        stops = self.stops
        holders = [  # (the simulator offers none in its prefill: each one answers)
            Holder(r, standing(tickets[r.index]), r.dispatched, tickets[r.index].tenant, True,
                   stops=stops.get(r.index, 0))
            for r in running
        ]  # fmt: skip
        waiter = standing(head, waiting=True)

        def order(holder: Holder[Running]) -> tuple[int, int, float]:
            return backlog(holder.key.replica, waiter), holder.stops, -holder.granted

        stopped = victim(waiter, holders, order, head.tenant)
        if stopped is None:
            return []
        index = stopped.key.index
        ticket = self.tickets[index]
        self.preempted[ticket.tenant] = self.preempted.get(ticket.tenant, 0) + 1
        stops[index] = stops.get(index, 0) + 1
        # it waits in the class it was stopped in (so not before the waiter), never refused
        self.queue.push(index, ticket.tenant, stopped.priority, 0.0, now, first=True)
        return [index]

    def complete(self, index: int, request: TraceRequest, now: float) -> None:
        tenant, reserved = request.tenant or "", self.reserved.pop(index, 0.0)
        self.stops.pop(index, None)
        self.queue.charge(tenant, prompt_tokens(request), request.max_tokens, reserved)


@dataclass(slots=True)
class _Waiter:
    index: int
    tenant: str
    deadline: float


class LlmdRoundRobin:
    """llm-d flow control with `round-robin-fairness-policy`, re-implemented from its
    description (llm-d-router #1182):

    1. Priority bands are strict: a band is served only when every more important band is empty.
    2. Within a band, flows (tenants) take turns, one request per turn, whatever its size.
    3. Within a flow, first come first served; a flow's queue is bounded and requests expire
       after a time-to-live (the same bounds as ours).
    4. Dispatch only while the replicas have free slots (the saturation detector).
    """

    name = "llmd-round-robin"
    gated = True

    def __init__(self, sc: Scenario) -> None:
        self.max_queue, self.ttl = sc.max_queue_per_tenant, sc.max_wait_s
        self.bands: dict[int, dict[str, deque[_Waiter]]] = {}
        self.turns: dict[int, deque[str]] = {}
        self.refused: dict[str, int] = {}

    def arrive(self, index: int, request: TraceRequest, now: float) -> bool:
        tenant = request.tenant or ""
        flows = self.bands.setdefault(request.priority, {})
        if tenant not in flows:
            flows[tenant] = deque()
            self.turns.setdefault(request.priority, deque()).append(tenant)
        self._expire(now)
        if len(flows[tenant]) >= self.max_queue:
            self.refused[tenant] = self.refused.get(tenant, 0) + 1
            return False
        flows[tenant].append(_Waiter(index, tenant, now + self.ttl))
        return True

    def _expire(self, now: float) -> None:
        for flows in self.bands.values():
            for flow in flows.values():
                while flow and flow[0].deadline <= now:
                    flow.popleft()

    def next(self, now: float, free_slots: int) -> int | None:
        self._expire(now)
        if free_slots <= 0:
            return None
        for band in sorted(self.bands):
            flows, turns = self.bands[band], self.turns[band]
            for _ in range(len(turns)):
                tenant = turns[0]
                turns.rotate(-1)
                if flows[tenant]:
                    return flows[tenant].popleft().index
        return None

    def complete(self, index: int, request: TraceRequest, now: float) -> None:
        """Nothing: round-robin does not count tokens."""


class SglangPriority:
    """SGLang's priority scheduling behind its gateway's queue, re-implemented from their
    documentation:

    1. Strict priority classes (lower value first here, as vLLM's), first come first served
       within a class.
    2. One queue for all callers, bounded at `queue_size` (429 beyond it), each request timing
       out after `queue_timeout` (408); here the same total size and wait as ours.
    3. Dispatch only while the replicas have free slots (`max-concurrent-requests`).
    """

    name = "sglang-priority"
    gated = True

    def __init__(self, sc: Scenario) -> None:
        self.queue_size = sc.max_queue_per_tenant * len(sc.tenants)
        self.timeout = sc.max_wait_s
        # (priority, arrival order, request index, deadline, tenant)
        self.heap: list[tuple[int, int, int, float, str]] = []
        self.seq = 0
        self.refused: dict[str, int] = {}

    def arrive(self, index: int, request: TraceRequest, now: float) -> bool:
        tenant = request.tenant or ""
        self._expire(now)
        if len(self.heap) >= self.queue_size:
            self.refused[tenant] = self.refused.get(tenant, 0) + 1
            return False
        self.seq += 1
        heapq.heappush(self.heap, (request.priority, self.seq, index, now + self.timeout, tenant))
        return True

    def _expire(self, now: float) -> None:
        if any(w[3] <= now for w in self.heap):
            self.heap = [w for w in self.heap if w[3] > now]
            heapq.heapify(self.heap)

    def next(self, now: float, free_slots: int) -> int | None:
        self._expire(now)
        if free_slots <= 0 or not self.heap:
            return None
        return heapq.heappop(self.heap)[2]

    def complete(self, index: int, request: TraceRequest, now: float) -> None:
        """Nothing: priority classes do not count tokens."""


class AibrixAdmission:
    """No queue (AIBrix routes at once; the engines serve FCFS): feeds `vtc-basic`'s token
    tracker, input tokens on arrival and output tokens on completion."""

    name = "aibrix-vtc-basic"
    gated = False

    def __init__(self, tracker: VtcTokenTracker) -> None:
        self.tracker = tracker
        self.arrived: deque[int] = deque()
        self.refused: dict[str, int] = {}

    def arrive(self, index: int, request: TraceRequest, now: float) -> bool:
        self.tracker.add(request.tenant or "", prompt_tokens(request), 0, now)
        self.arrived.append(index)
        return True

    def next(self, now: float, free_slots: int) -> int | None:
        return self.arrived.popleft() if self.arrived else None

    def complete(self, index: int, request: TraceRequest, now: float) -> None:
        self.tracker.add(request.tenant or "", 0, request.max_tokens, now)


RULES = (
    "fcfs", "fair", "fair-queue", "llmd-round-robin", "sglang-priority", "aibrix-vtc-basic"
)  # fmt: skip


def _run(rule: str, sc: Scenario, requests: list[TraceRequest]) -> tuple[ReplayResult, dict]:
    """Replay `requests` under `rule`; the result and the refusals per tenant."""
    policy = lab_policy("scored", sc.settings, sc.seed)
    admission: Admission | None
    if rule == "fcfs":
        admission = None
    elif rule == "fair":
        admission = FairAdmission(sc, requests)
    elif rule == "fair-queue":
        admission = FairAdmission(sc, requests, demote_backlog=None, preempt=False)
    elif rule == "llmd-round-robin":
        admission = LlmdRoundRobin(sc)
    elif rule == "sglang-priority":
        admission = SglangPriority(sc)
    elif rule == "aibrix-vtc-basic":
        tracker = VtcTokenTracker(input_weight=PROMPT_WEIGHT, output_weight=OUTPUT_WEIGHT)
        policy = AibrixVtcBasic(tracker, seed=sc.seed)
        admission = AibrixAdmission(tracker)
    else:
        raise ValueError(f"unknown admission rule {rule!r}; allowed: {', '.join(RULES)}")
    result = replay(requests, policy, sc.replicas, sc.settings, admission=admission)
    return result, dict(getattr(admission, "refused", {}))


# --- figures ---------------------------------------------------------------------------------


def jain(values: Sequence[float]) -> float:
    """Jain's fairness index: (sum x)^2 / (n * sum x^2); 1 when all are equal."""
    total, squares = sum(values), sum(v * v for v in values)
    return total * total / (len(values) * squares) if squares else 1.0


def fair_allocation(
    capacity: float, demand: dict[str, float], tenants: Sequence[TenantSpec]
) -> dict[str, float]:
    """Weighted max-min fair service per tenant (units/s), classes served in priority order.

    1. Give each priority class, most important first, what is left of `capacity`.
    2. Within a class, raise a common level L: tenant i gets min(demand_i, L * weight_i),
       until the class's share is used or every demand is met (water-filling).
    Tenants below their share get their demand; backlogged tenants split the rest by weight.
    """
    left = capacity
    out: dict[str, float] = {}
    for priority in sorted({t.priority for t in tenants}):
        members = [t for t in tenants if t.priority == priority]
        open_ = list(members)
        budget = left
        while open_:
            level = budget / sum(t.weight for t in open_)
            met = [t for t in open_ if demand.get(t.name, 0.0) <= level * t.weight]
            if not met:
                for t in open_:
                    out[t.name] = level * t.weight
                break
            for t in met:
                out[t.name] = demand.get(t.name, 0.0)
                budget -= out[t.name]
                open_.remove(t)
        left -= sum(out[t.name] for t in members)
    return out


@dataclass(slots=True)
class RuleFigures:
    """One admission rule's figures in the noisy-neighbour scenario (simulated)."""

    rule: str
    worst_tenant: str
    worst_p99_ratio: float
    others_p99_s: dict[str, float]
    others_alone_p99_s: dict[str, float]
    others_unserved: float
    jain: float
    noisy_rps: float
    noisy_service_share: float
    rejected: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """Plain JSON (rounded; an unmeasurable ratio or p99 as null)."""

        def plain(value: Any) -> Any:
            if isinstance(value, float):
                return round(value, 4) if math.isfinite(value) else None
            if isinstance(value, dict):
                return {k: plain(v) for k, v in value.items()}
            return value

        return {key: plain(getattr(self, key)) for key in self.__slots__}  # type: ignore[attr-defined]


def _p99_by_tenant(
    result: ReplayResult, requests: Sequence[TraceRequest], t0: float, t1: float
) -> tuple[dict[str, float], dict[str, tuple[int, int]]]:
    """TTFT p99 per tenant of requests arriving in [t0, t1), and (served, arrived) counts."""
    ttfts: dict[str, list[float]] = {}
    counts: dict[str, tuple[int, int]] = {}
    for job, r in zip(result.jobs, requests, strict=True):
        if not t0 <= job.arrival < t1:
            continue
        tenant = r.tenant or ""
        served, arrived = counts.get(tenant, (0, 0))
        ok = job.replica >= 0
        counts[tenant] = (served + ok, arrived + 1)
        if ok:
            ttfts.setdefault(tenant, []).append(job.ttft)
    return {t: percentile(v, 99) for t, v in ttfts.items()}, counts


@dataclass(slots=True)
class TenantsLab:
    """The scenario's inputs: its shape, measured capacity and the tenants' request rates."""

    scenario: Scenario
    capacity_units_s: float
    rates: dict[str, float]
    requests: list[TraceRequest]
    alone: list[TraceRequest]


def build(sc: Scenario | None = None) -> TenantsLab:
    """Measure capacity, set each tenant's rate from its share, generate both traces."""
    sc = sc or Scenario()
    capacity = measure_capacity(sc)
    mean_units = (sum(sc.prompt_tokens) / 2) * PROMPT_WEIGHT + (
        sum(sc.output_tokens) / 2
    ) * OUTPUT_WEIGHT
    share = capacity * sc.share_of_capacity / sum(t.weight for t in sc.tenants)
    rates = {t.name: share * t.weight * t.multiple / mean_units for t in sc.tenants}
    requests = _requests(sc, rates, sc.duration_s, sc.seed)
    alone = [r for r in requests if r.tenant != NOISY]
    return TenantsLab(sc, capacity, rates, requests, alone)


def run_rule(lab: TenantsLab, rule: str) -> RuleFigures:
    """One rule with the noisy tenant and without it, on the same other requests."""
    sc = lab.scenario
    t0, t1 = sc.warmup_s, sc.duration_s
    noisy, refused = _run(rule, sc, lab.requests)
    alone, _ = _run(rule, sc, lab.alone)
    p99, counts = _p99_by_tenant(noisy, lab.requests, t0, t1)
    p99_alone, _ = _p99_by_tenant(alone, lab.alone, t0, t1)
    others = [t.name for t in sc.tenants if t.name != NOISY]
    ratios = {
        t: p99.get(t, math.inf) / p99_alone[t] if p99_alone.get(t) else math.inf for t in others
    }
    worst = max(others, key=lambda t: ratios[t])
    served = sum(counts.get(t, (0, 0))[0] for t in others)
    arrived = sum(counts.get(t, (0, 0))[1] for t in others)
    units = _served_units(noisy, lab.requests, t0, t1)
    demand: dict[str, float] = {}
    for r in lab.requests:
        if t0 <= r.t < t1:
            demand[r.tenant or ""] = demand.get(r.tenant or "", 0.0) + service_units(r) / (t1 - t0)
    owed = fair_allocation(lab.capacity_units_s, demand, sc.tenants)
    normalised = [units.get(t.name, 0.0) / (t1 - t0) / owed[t.name] for t in sc.tenants]
    noisy_served = counts.get(NOISY, (0, 0))[0]
    return RuleFigures(
        rule=rule,
        worst_tenant=worst,
        worst_p99_ratio=ratios[worst],
        others_p99_s={t: p99.get(t, math.inf) for t in others},
        others_alone_p99_s={t: p99_alone.get(t, math.inf) for t in others},
        others_unserved=1 - served / arrived if arrived else 0.0,
        jain=jain(normalised),
        noisy_rps=noisy_served / (t1 - t0),
        noisy_service_share=units.get(NOISY, 0.0) / ((t1 - t0) * lab.capacity_units_s),
        rejected=refused,
    )


def run_tenants_lab(
    sc: Scenario | None = None, rules: Sequence[str] = RULES
) -> tuple[TenantsLab, list[RuleFigures]]:
    """The noisy-neighbour comparison: each rule's figures on the same traces."""
    lab = build(sc)
    return lab, [run_rule(lab, rule) for rule in rules]
