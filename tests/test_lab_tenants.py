"""The noisy-neighbour lab (simulated replicas): rules compared, figures, the admission hook."""

from __future__ import annotations

import json
from collections import deque

import pytest
from typer.testing import CliRunner

from app.cli import cli
from app.lab.run import lab_policy
from app.lab.simulator import SimSettings, replay
from app.lab.tenants import (
    DEFAULT_TENANTS,
    NOISY,
    RULES,
    Scenario,
    TenantSpec,
    fair_allocation,
    jain,
    run_tenants_lab,
)
from app.lab.trace import TraceRequest, parse_line
from app.lab.workloads import shared_prefix

SMALL = Scenario(duration_s=30, warmup_s=5)


@pytest.fixture(scope="module")
def small_lab():
    lab, results = run_tenants_lab(SMALL)
    return lab, {r.rule: r for r in results}


def test_rates_follow_shares_and_the_noisy_tenant_sends_ten_times_its_share(small_lab):
    lab, _ = small_lab
    r = lab.rates
    assert r[NOISY] == pytest.approx(10 * r["team-a"]) and r["premium"] == pytest.approx(
        2 * r["team-a"]
    )
    sent = sum(1 for q in lab.requests if q.tenant == NOISY)
    assert sent > 5 * sum(1 for q in lab.requests if q.tenant == "team-a")
    assert all(q.tenant != NOISY for q in lab.alone)


def test_ours_isolates_the_others_and_is_fair(small_lab):
    _, by_rule = small_lab
    fair = by_rule["fair"]
    assert fair.jain >= 0.95
    assert fair.others_unserved == 0.0  # only the noisy tenant's queue overflows
    assert fair.rejected.get(NOISY, 0) > 0 and set(fair.rejected) == {NOISY}
    for rule, other in by_rule.items():
        if rule != "fair":
            assert fair.worst_p99_ratio < other.worst_p99_ratio, rule
            assert max(fair.others_p99_s.values()) < max(other.others_p99_s.values()), rule
    fcfs = by_rule["fcfs"]
    assert fcfs.worst_p99_ratio > 20 * fair.worst_p99_ratio and fcfs.jain < 0.8
    assert fcfs.noisy_rps > fair.noisy_rps > 0  # the noisy tenant still gets the leftover


def test_peers_rules_show_their_documented_weaknesses(small_lab):
    _, by_rule = small_lab
    assert by_rule["sglang-priority"].others_unserved > 0.2  # one shared queue fills up
    sglang = by_rule["sglang-priority"]
    assert sglang.others_p99_s["interactive"] < sglang.others_p99_s["team-a"] / 5  # class 0 safe
    assert by_rule["llmd-round-robin"].worst_tenant == "premium"  # turns ignore weight
    assert by_rule["aibrix-vtc-basic"].others_unserved == 0.0  # a router: no queue, no refusal


def test_fair_allocation_water_fills_by_class_and_weight():
    tenants = (
        TenantSpec("hi", 1.0, 0),
        TenantSpec("a", 2.0, 10),
        TenantSpec("b", 1.0, 10),
        TenantSpec("c", 1.0, 10),
    )
    owed = fair_allocation(100, {"hi": 10, "a": 100, "b": 100, "c": 5}, tenants)
    assert owed == pytest.approx({"hi": 10, "c": 5, "a": 56.6667, "b": 28.3333}, rel=1e-4)
    assert jain([1, 1, 1]) == 1 and jain([1, 0]) == 0.5


def test_trace_lines_carry_tenant_and_priority():
    req = TraceRequest(1.0, "m", tokens=[1, 2], max_tokens=3, tenant="t", priority=5)
    back = parse_line(json.dumps(req.to_json()))
    assert (back.tenant, back.priority) == ("t", 5)
    plain = TraceRequest(1.0, "m", prompt="x").to_json()
    assert "tenant" not in plain and "priority" not in plain  # existing traces unchanged


class _PassThrough:
    """An ungated rule that dispatches every arrival at once, in order."""

    gated = False

    def __init__(self) -> None:
        self.queue: deque[int] = deque()
        self.completed = 0

    def arrive(self, index, request, now):
        self.queue.append(index)
        return True

    def next(self, now, free_slots):
        return self.queue.popleft() if self.queue else None

    def complete(self, index, request, now):
        self.completed += 1


def test_a_pass_through_admission_changes_no_decision():
    reqs = shared_prefix(groups=4, prompts_per_group=8, system_prompt=300, question=32, qps=6)
    s = SimSettings(cache_blocks=256, max_concurrency=4)
    plain = replay(reqs, lab_policy("scored", s), 3, s)
    hook = _PassThrough()
    hooked = replay(reqs, lab_policy("scored", s), 3, s, admission=hook)
    assert [(d.replica_id, d.reason) for d in hooked.decisions] == [
        (d.replica_id, d.reason) for d in plain.decisions
    ]
    assert [j.ttft for j in hooked.jobs] == [j.ttft for j in plain.jobs]
    assert hook.completed == len(reqs)


def test_cli_prints_the_comparison():
    result = CliRunner().invoke(
        cli, ["lab", "--tenants", "--json", "--param", "duration_s=20", "-p", "warmup_s=5"]
    )
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["simulated"] is True and list(out["rules"]) == list(RULES)
    assert set(out["rules"]["fair"]["others_p99_s"]) == {t.name for t in DEFAULT_TENANTS} - {NOISY}
    table = CliRunner().invoke(cli, ["lab", "--tenants", "-p", "duration_s=20", "-p", "warmup_s=5"])
    assert table.exit_code == 0 and "llmd-round-robin" in table.output
    bad = CliRunner().invoke(cli, ["lab", "--tenants", "-p", "nope=1"])
    assert bad.exit_code == 2 and "bad --param" in bad.output


def test_demotion_and_preemption_are_what_keep_the_others_isolated(small_lab):
    _, by_rule = small_lab
    fair, queue_only = by_rule["fair"], by_rule["fair-queue"]
    assert fair.worst_p99_ratio < queue_only.worst_p99_ratio
    assert max(fair.others_p99_s.values()) < max(queue_only.others_p99_s.values())
    assert fair.jain >= 0.95 and queue_only.jain >= 0.95


# --- the simulator's priority scheduling and preemption


def _two(first_priority: int, second_priority: int) -> list[TraceRequest]:
    return [
        TraceRequest(0.0, "m", tokens=list(range(1000)), max_tokens=10, priority=first_priority),
        TraceRequest(0.01, "m", tokens=list(range(5000, 5010)), max_tokens=10,
                     priority=second_priority),
    ]  # fmt: skip


@pytest.mark.parametrize("by_priority", [False, True])
def test_a_more_important_prefill_pauses_a_less_important_one(by_priority):
    s = SimSettings(max_concurrency=4, priority_scheduling=by_priority)
    big, small = replay(_two(20, 0), lab_policy("scored", s), 1, s).jobs
    big_alone = s.prefill_overhead + s.prefill_cost * 1000
    small_alone = s.prefill_overhead + s.prefill_cost * 10
    if by_priority:  # the small one goes at once; the big one's prefill resumes after it
        assert small.ttft == pytest.approx(small_alone)
        assert big.ttft == pytest.approx(big_alone + small_alone)
    else:  # first come first served
        assert big.ttft == pytest.approx(big_alone)
        assert small.ttft == pytest.approx(big_alone - 0.01 + small_alone)


class _Preempting:
    """A gated rule over one slot: by priority, and a waiter stops a less important holder."""

    gated = True

    def __init__(self, requests: list[TraceRequest]) -> None:
        self.requests, self.waiting, self.stopped = requests, [], []

    def arrive(self, index, request, now):
        self.waiting.append(index)
        return True

    def next(self, now, free_slots):
        if free_slots <= 0 or not self.waiting:
            return None
        self.waiting.sort(key=lambda i: self.requests[i].priority)
        return self.waiting.pop(0)

    def preempt(self, now, running, backlog):
        if not self.waiting or backlog(0, 100) != 0:
            return []
        head = min(self.requests[i].priority for i in self.waiting)
        victims = [r.index for r in running if r.priority > head]
        self.stopped += victims
        self.waiting += victims
        return victims

    def complete(self, index, request, now):
        pass


def test_a_preempted_request_keeps_its_tokens_and_its_first_token_time():
    s = SimSettings(max_concurrency=1, priority_scheduling=True)
    reqs = [
        TraceRequest(0.0, "m", tokens=list(range(100)), max_tokens=50, priority=20),
        TraceRequest(0.3, "m", tokens=list(range(5000, 5100)), max_tokens=10, priority=0),
    ]
    rule = _Preempting(reqs)
    low, high = replay(reqs, lab_policy("scored", s), 1, s, admission=rule).jobs
    prefill = s.prefill_overhead + s.prefill_cost * 100
    assert rule.stopped == [0]
    assert high.ttft == pytest.approx(prefill)  # it got the slot at once
    assert low.ttft == pytest.approx(prefill) and low.preemptions == 1
    made = int((0.3 - prefill) / s.decode_cost)  # tokens made before it was stopped
    assert low.generated == made
    resumed_at = high.finish  # the slot came back when the high one was done
    uncached = 100 % s.block_size + made  # its prompt's full blocks are cached
    reprefill = s.prefill_overhead + s.prefill_cost * uncached
    assert low.finish == pytest.approx(resumed_at + reprefill + s.decode_cost * (50 - made))
