"""The noisy-neighbour benchmark's stacks are valid configs, one per rule (the run itself is a
long command beside the benchmarks: docs/tenants.md)."""

from __future__ import annotations

from app.config import load_config
from benchmarks.tenants_cpu import NOISY, OTHERS, RULES, Phase, keys, parser, stack_args


def test_each_rule_is_a_valid_stack_of_the_rules_kind():
    a = parser().parse_args([])
    configs = {rule: load_config(stack_args(rule, a)) for rule in RULES}
    fair, queue_only, fcfs = configs["fair"], configs["fair-queue"], configs["fcfs"]
    assert {t.name for t in fair.tenants} == set(keys()) and not fcfs.tenants
    assert next(t for t in fair.tenants if t.name == NOISY).priority == "standard"
    assert fair.admission.preempt and fair.admission.demote_backlog == 16
    assert not queue_only.admission.preempt and queue_only.admission.demote_backlog is None
    for config in configs.values():
        (model,) = config.models
        assert model.replicas == a.replicas
        assert model.engine_args["max_num_seqs"] == a.max_num_seqs


def test_the_others_are_also_reported_together():
    phase = Phase(ttfts={"interactive": [1.0] * 9 + [5.0], "team-a": [1.0] * 10})
    figures = phase.figures()
    assert figures["team-a"]["ttft_p99"] == 1.0 and figures["interactive"]["ttft_p99"] > 4.0
    assert figures[OTHERS]["answered"] == 20 and figures[OTHERS]["ttft_p50"] == 1.0
    assert 1.0 < figures[OTHERS]["ttft_p99"] < figures["interactive"]["ttft_p99"]
