"""The simulator, the oracle, the lab runs and `vrstack lab`."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from app.cli import cli
from app.lab.oracle import pooled_oracle, unbounded_oracle
from app.lab.run import LAB_POLICIES, run_lab
from app.lab.simulator import SimSettings, SimulatedReplica, replay
from app.lab.trace import TraceRequest, write_trace
from app.lab.workloads import shared_prefix
from app.routing import make_policy

SMALL = SimSettings(cache_blocks=256, block_size=16, max_concurrency=4)


def _trace():
    return shared_prefix(groups=6, prompts_per_group=8, system_prompt=400, question=32, qps=4)


def test_simulated_replica_caches_and_costs():
    req = [
        TraceRequest(0.0, "m", tokens=list(range(64)), max_tokens=10),
        TraceRequest(5.0, "m", tokens=list(range(64)), max_tokens=10),
    ]
    s = SimSettings(prefill_cost=0.01, prefill_overhead=0.0, decode_cost=0.1)
    result = replay(req, make_policy("round_robin"), 1, s)
    cold, warm = result.jobs
    assert cold.cached_tokens == 0 and abs(cold.ttft - 0.64) < 1e-9
    assert warm.cached_tokens == 64 and warm.ttft == 0.0
    assert abs(cold.finish - 1.64) < 1e-9


def test_concurrency_limit_queues():
    reqs = [TraceRequest(0.0, "m", tokens=[i] * 16, max_tokens=100) for i in range(3)]
    s = SimSettings(max_concurrency=1, prefill_cost=0.0, prefill_overhead=0.0, decode_cost=0.01)
    result = replay(reqs, make_policy("round_robin"), 1, s)
    assert sorted(round(j.ttft, 6) for j in result.jobs) == [0.0, 1.0, 2.0]


def test_cache_stays_within_capacity():
    sim = SimulatedReplica("x", SimSettings(cache_blocks=5))
    sim.cache.store(list(range(20)))
    assert len(sim.cache) == 5


def test_oracle_bounds():
    views = [r.view() for r in _trace()]
    big = unbounded_oracle(views, 16)
    assert pooled_oracle(views, 4 * 256, 16) <= big
    assert pooled_oracle(views, 10, 16) <= pooled_oracle(views, 4 * 256, 16)


def test_scored_beats_round_robin_on_shared_prefix():
    rr, scored = run_lab(_trace(), ["round_robin", "scored"], 4, SMALL)
    assert scored.hit_rate > rr.hit_rate
    assert scored.hit_rate <= scored.oracle_hit_rate + 1e-9


def test_lab_is_deterministic():
    a = run_lab(_trace(), LAB_POLICIES, 3, SMALL, seed=5)
    b = run_lab(_trace(), LAB_POLICIES, 3, SMALL, seed=5)
    assert [x.to_json() for x in a] == [x.to_json() for x in b]


def test_cli_json_with_a_trace_file(tmp_path):
    path = tmp_path / "t.jsonl"
    write_trace(path, _trace())
    args = ["lab", "--trace", str(path), "--replicas", "2", "--cache-blocks", "128"]
    out = CliRunner().invoke(cli, [*args, "--policy", "scored", "--json"])
    assert out.exit_code == 0, out.output
    data = json.loads(out.stdout)
    assert data["simulated"] is True and data["policy"] == "scored"
    for key in ("hit_rate", "ttft_p50_s", "ttft_p99_s", "throughput_rps", "load_imbalance"):
        assert key in data
    assert 0 <= data["hit_rate"] <= data["oracle_hit_rate"] + 1e-9


def test_cli_table_and_errors():
    runner = CliRunner()
    out = runner.invoke(
        cli, ["lab", "--workload", "shared-prefix", "-p", "groups=2", "-p", "prompts_per_group=4"]
    )
    assert out.exit_code == 0, out.output
    assert "scored" in out.stdout and "oracle" in out.stdout
    bad = runner.invoke(cli, ["lab", "--workload", "nope"])
    assert bad.exit_code == 2 and "multi-round-qa" in bad.output
    bad = runner.invoke(cli, ["lab", "--workload", "shared-prefix", "--policy", "fastest"])
    assert bad.exit_code == 2 and "scored" in bad.output
