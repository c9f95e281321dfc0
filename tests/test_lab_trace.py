"""Trace files and the workload generators."""

from __future__ import annotations

import itertools
import json

import pytest

from app.lab.trace import TraceRequest, parse_line, read_trace, write_trace
from app.lab.workloads import WORKLOADS, multi_round_qa, multi_tenant, shared_prefix
from app.routing import approx_tokens


def test_round_trip(tmp_path):
    reqs = [
        TraceRequest(0.5, "m", prompt="hello", session="s1", max_tokens=8),
        TraceRequest(0.1, "m", tokens=[1, 2, 3], max_tokens=4),
    ]
    path = tmp_path / "t.jsonl"
    write_trace(path, reqs)
    back = read_trace(path)
    assert [r.t for r in back] == [0.1, 0.5]  # sorted by time
    assert back[0].tokens == [1, 2, 3] and back[1].prompt == "hello" and back[1].session == "s1"


def test_messages_are_rendered():
    line = json.dumps({"t": 0, "model": "m", "messages": [{"role": "user", "content": "hi"}]})
    assert parse_line(line).prompt == "user: hi\n"


@pytest.mark.parametrize(
    "line",
    ['{"model": "m", "prompt": "x"}', '{"t": 0, "prompt": "x", "tokens": [1]}', "not json"],
)
def test_bad_lines_name_the_line(line):
    with pytest.raises(ValueError, match="trace line 7"):
        parse_line(line, 7)


@pytest.mark.parametrize("name", list(WORKLOADS))
def test_generators_are_deterministic_and_seeded(name):
    gen = WORKLOADS[name]
    a, b, c = gen(seed=3), gen(seed=3), gen(seed=4)
    assert [r.to_json() for r in a] == [r.to_json() for r in b]
    assert [r.prompt for r in a] != [r.prompt for r in c]
    assert all(x.t <= y.t for x, y in itertools.pairwise(a))


def test_generator_shapes():
    qa = multi_round_qa(users=3, rounds=2, system_prompt=100, history=50, answer=10, question=5)
    assert len(qa) == 6
    first = {r.session: r for r in qa[:3]}
    for r in qa[3:]:
        assert r.prompt.startswith(first[r.session].prompt)  # a round extends the last one
    assert approx_tokens(qa[0].prompt) == 155
    sp = shared_prefix(groups=2, prompts_per_group=3, system_prompt=64, question=8)
    assert len(sp) == 6 and len({r.prompt[:256] for r in sp}) == 2
    mt = multi_tenant(tenants=2, users_per_tenant=2, queries_per_user=2, shared_context=32)
    assert len(mt) == 8 and {r.session.split("-user")[0] for r in mt} == {"tenant-0", "tenant-1"}
