"""The peer benchmark's `--trace`: any trace file replayed over HTTP (`benchmarks.peer_bench`),
a blocks trace (what `vrstack capture` records) as token-id prompts that share exactly the
blocks the trace shares."""

from __future__ import annotations

import argparse
from dataclasses import replace

import pytest

from app.lab.trace import SYNTH_IDS, SYNTH_LOW, TraceRequest, block_token_ids, write_trace
from app.lab.workloads import shared_prefix
from app.routing import chain_hashes, prompt_text
from benchmarks.peer_bench import load_trace, run_router, sim_text
from tests.benchmarks.test_peer_fronts_e2e import workers  # noqa: F401 (the simulators)

A, B, C, D = 0x1111, 0x2222, 0x3333, 0xFFFF_FFFF_FFFF_FFFF


def test_block_token_ids_are_stable_and_share_exactly_the_shared_blocks():
    one = block_token_ids([A, B, C], 16, 50)
    other = block_token_ids([A, B, D], 16, 50)
    assert len(one) == len(other) == 50
    assert all(SYNTH_LOW <= i < SYNTH_LOW + SYNTH_IDS for i in one + other)
    assert one == block_token_ids([A, B, C], 16, 50)  # the same hashes, the same ids
    assert one[:32] == other[:32] and one[32:48] != other[32:48]
    assert block_token_ids([B], 16, 16) == one[16:32]  # a block's ids do not depend on its place
    assert one[:4] == [843, 324, 598, 624]  # pinned: stable across processes and releases
    # The simulators read token ids as decimal words, 4 bytes a token: the same blocks.
    texts = [chain_hashes(prompt_text({"prompt": ids})) for ids in (one, other)]
    assert len(texts[0]) == len(texts[1]) == 3
    assert texts[0][:2] == texts[1][:2] and texts[0][2] != texts[1][2]


def test_a_blocks_line_replays_as_token_ids_and_others_as_they_are():
    blocks = TraceRequest(0.0, "m", blocks=[A, B], prompt_tokens=40, output_tokens=7)
    ids = blocks.replay_prompt()
    assert ids == block_token_ids([A, B], 16, 40) and blocks.decode_tokens == 7
    assert sim_text(blocks) == " ".join(map(str, ids))
    tokens = TraceRequest(0.0, "m", tokens=[1, 2, 3], max_tokens=5)
    assert tokens.replay_prompt() == [1, 2, 3] and tokens.decode_tokens == 5
    assert TraceRequest(0.0, "m", prompt="hi").replay_prompt() == "hi"


def _blocks_of(trace: list[TraceRequest]) -> list[TraceRequest]:
    """The trace as capture records it without text: block hashes and lengths."""
    out = []
    for r in trace:
        view = r.view()
        hashes = [h & (2**64 - 1) for h in view.block_hashes()]
        out.append(
            replace(
                r, model="captured", prompt=None, blocks=hashes, prompt_tokens=view.prompt_tokens
            )
        )
    return out


def test_a_blocks_trace_replays_through_a_router_as_its_text_does(
    workers,  # noqa: F811 (the fixture imported above)
    tmp_path,
):
    text = shared_prefix(groups=2, prompts_per_group=10, system_prompt=256, question=20, output=4)
    path = tmp_path / "captured.jsonl"
    write_trace(path, _blocks_of(text))
    a = argparse.Namespace(
        trace=str(path), requests=20, seed=0, cache_blocks=2048, warmup=1, time_scale=0.1,
        router_timeout=60, start_timeout=30, peer_venv="/nonexistent", log_dir=str(tmp_path),
    )  # fmt: skip
    trace = load_trace(path.stem, a, {})
    assert len(trace) == 20 and {r.model for r in trace} == {"default"}
    got = run_router("ours:prefix", workers, trace, a)
    assert got["ok"] == 20 and got["errors"] == 0, got
    assert got["unscheduled"] == 0  # every request found its modelled arrival time
    sent = sum(r.view().prompt_tokens for r in text)
    assert got["hit_rate"] > 0.5
    same = run_router("ours:prefix", workers, [replace(r, model="default") for r in text], a)
    assert got["hit_rate"] == pytest.approx(same["hit_rate"], abs=0.02)
    assert sent == sum(r.prompt_tokens or 0 for r in trace)
