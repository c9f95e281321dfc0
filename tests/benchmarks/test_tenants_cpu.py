"""The noisy-neighbour benchmark's stacks are valid configs, one per rule (the run itself is a
long command beside the benchmarks: docs/tenants.md)."""

from __future__ import annotations

from app.config import load_config
from benchmarks.tenants_cpu import NOISY, RULES, keys, parser, stack_args


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
