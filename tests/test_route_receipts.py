"""Route receipts from the policies (`app.routing.receipts`)."""

from __future__ import annotations

import json
import random

import pytest

from app.routing import BlockStored, ReplicaStats, RequestView, make_policy
from app.routing.receipts import TERMS, predicted_cached


def _view(tokens: list[int], receipt: bool = True) -> RequestView:
    return RequestView("m", token_ids=tokens, receipt=receipt)


def test_no_receipt_unless_asked_but_the_match_always():
    policy = make_policy("scored", block_size=4)
    reps = [ReplicaStats("r0"), ReplicaStats("r1")]
    tokens = list(range(40))
    first = policy.choose(_view(tokens, receipt=False), reps)
    assert first.receipt is None and first.match == 0.0
    policy.on_complete(_view(tokens), first.replica_id)
    again = policy.choose(_view([*tokens, 99, 98, 97, 96], receipt=False), reps)
    assert again.receipt is None and again.match == pytest.approx(40 / 44)


@pytest.mark.parametrize("seed", range(20))
def test_a_scored_receipt_explains_the_pick(seed):
    """Each candidate's score is the sum of its terms; the winner is the best-scoring replica
    the guard allows (ties: the fewest in flight plus queued); the margin and predicted cached
    tokens follow from them."""
    rng = random.Random(seed)
    policy = make_policy("scored", block_size=4)
    prompts = [list(range(k * 1000, k * 1000 + rng.randrange(8, 60))) for k in range(4)]
    for _ in range(30):  # history: an index and loads
        reps = [
            ReplicaStats(
                f"r{i}", in_flight=rng.randrange(6), queued=rng.randrange(2), kv_usage=rng.random()
            )
            for i in range(4)
        ]
        base = rng.choice(prompts)
        tokens = base + [rng.randrange(10**6) for _ in range(rng.randrange(12))]
        d = policy.choose(_view(tokens), reps)
        r = d.receipt
        assert r is not None and (r.replica_id, r.policy, r.reason) == d[:3]
        assert [c.replica_id for c in r.candidates] == [c.replica_id for c in reps]
        for c in r.candidates:
            assert c.terms is not None and set(c.terms) == set(TERMS)
            assert c.score == pytest.approx(sum(c.terms.values()))
        allowed = [c for c in r.candidates if not c.hotspot] or list(r.candidates)
        best = max(c.score for c in allowed)
        winners = [c for c in allowed if c.score == pytest.approx(best)]
        chosen = next(c for c in r.candidates if c.replica_id == d.replica_id)
        assert chosen in winners
        others = [c.score for c in r.candidates if c is not chosen]
        assert r.margin == pytest.approx(chosen.score - max(others))
        assert chosen.match == d.match
        assert r.predicted_cached_tokens == predicted_cached(chosen.match, len(tokens), 4)
        if rng.random() < 0.7:
            policy.on_complete(_view(tokens), d.replica_id)


def test_a_kv_receipt_predicts_the_blocks_the_engine_reported():
    policy = make_policy("kv", block_size=4)
    reps = [ReplicaStats("r0"), ReplicaStats("r1")]
    tokens = list(range(100, 122))  # 22 tokens: 5 full blocks
    policy.on_kv_event("m", "r1", BlockStored([1, 2, 3], None, tokens[:12], 4))
    d = policy.choose(_view(tokens), reps)
    assert (d.replica_id, d.reason) == ("r1", "kv-match=0.55")
    assert d.receipt is not None and d.receipt.predicted_cached_tokens == 12
    matches = {c.replica_id: c.match for c in d.receipt.candidates}
    assert matches == {"r0": 0.0, "r1": pytest.approx(12 / 22)}


def test_a_whole_prompt_cached_predicts_all_but_its_last_block():
    assert predicted_cached(1.0, 16, 4) == 12  # the engine computes the last token again
    assert predicted_cached(1.0, 17, 4) == 16
    assert predicted_cached(0.5, 16, 4) == 8
    assert predicted_cached(0.0, 16, 4) == 0


@pytest.mark.parametrize("name", ["round_robin", "power_of_two", "session", "prefix"])
def test_every_policy_gives_a_receipt_when_asked(name):
    policy = make_policy(name)
    reps = [ReplicaStats("r0", in_flight=2), ReplicaStats("r1", queued=1)]
    view = RequestView("m", text="hello " * 50, session_key="u1", receipt=True)
    d = policy.choose(view, reps)
    r = d.receipt
    assert r is not None and r.replica_id == d.replica_id and r.reason == d.reason
    out = json.loads(json.dumps(r.to_json()))
    assert [(c["replica"], c["in_flight"], c["queued"]) for c in out["candidates"]] == [
        ("r0", 2, 0),
        ("r1", 0, 1),
    ]
    assert out["margin"] is None and all("score" not in c for c in out["candidates"])
    assert out["prompt_tokens"] == view.prompt_tokens and out["predicted_cached_tokens"] == 0
