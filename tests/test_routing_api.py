"""The routing package's API: import isolation, registry, policies' rules, KV events."""

from __future__ import annotations

import subprocess
import sys

import pytest

from app.routing import (
    POLICY_NAMES,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    ChainIndex,
    HotspotGuard,
    NoReplicaError,
    Policy,
    PrefixIndex,
    ReplicaStats,
    RequestView,
    ScoredWeights,
    chain_hashes,
    make_policy,
    prompt_text,
    view_of_body,
)
from app.routing.tokens import approx_tokens


def _replicas(n: int, **kw) -> list[ReplicaStats]:
    return [ReplicaStats(f"r{i}", **kw) for i in range(n)]


def test_import_pulls_in_neither_ray_nor_fastapi():
    code = (
        "import sys, app.routing, app.lab.run;print('ray' in sys.modules, 'fastapi' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_registry_names_and_unknown_name():
    assert POLICY_NAMES == ("round_robin", "power_of_two", "session", "prefix", "kv", "scored")
    for name in POLICY_NAMES:
        policy = make_policy(name)
        assert isinstance(policy, Policy)
        assert policy.name == name
    with pytest.raises(ValueError) as err:
        make_policy("fastest")
    for name in POLICY_NAMES:
        assert name in str(err.value)


def test_default_is_scored():
    assert make_policy().name == "scored"


def test_peer_routers_satisfy_the_policy_protocol():
    from app.lab.peers import PEERS

    for cls in PEERS.values():
        peer = cls(seed=0)
        assert isinstance(peer, Policy)
        peer.on_first_token(RequestView("m", text="x"), "r0")  # a no-op


def test_scored_takes_flat_settings_grouped():
    policy = make_policy("scored", max_blocks=400, w_prefix=2.0, hotspot_abs=4.0)
    assert policy.weights == ScoredWeights(w_prefix=2.0)
    assert policy.guard == HotspotGuard(hotspot_abs=4.0)
    with pytest.raises(TypeError, match="w_magic"):
        make_policy("scored", w_prefix=2.0, w_magic=1)


def test_bodies_read_as_views():
    messages = [{"role": "system", "content": "be brief"}, {"content": "hi"}, "not a message"]
    chat = {"model": "m", "messages": messages}
    view = view_of_body(chat, model="default", session_key="", lora_adapter="")
    assert view.text == "system: be brief\nuser: hi\n" == prompt_text(chat)
    assert (view.model, view.session_key, view.lora_adapter) == ("m", None, None)
    tokens = view_of_body({"prompt": [1, 2, 3], "user": "u"}, model="d", lora_adapter="sql")
    assert (tokens.model, tokens.token_ids, tokens.text) == ("d", [1, 2, 3], None)
    assert (tokens.session_key, tokens.lora_adapter) == ("u", "sql")
    assert view_of_body({"prompt": "p", "user": "u"}, model="d", session_key="s").session_key == "s"
    assert view_of_body({"prompt": ["first", "second"]}, model="d").text == "first"
    assert prompt_text({"prompt": [1, 2]}) == "1 2" and prompt_text({}) == ""
    assert view_of_body({}, model="d").text is None


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_no_healthy_replica_raises(name):
    with pytest.raises(NoReplicaError):
        make_policy(name).choose(RequestView("m", text="hi"), _replicas(3, healthy=False))


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_lora_requests_prefer_replicas_holding_the_adapter(name):
    reps = [*_replicas(3), ReplicaStats("lora", lora_adapters=frozenset({"sql"}), in_flight=9)]
    policy = make_policy(name)
    for i in range(5):
        req = RequestView("m", text=f"q{i} " * 40, lora_adapter="sql", session_key=f"s{i}")
        assert policy.choose(req, reps).replica_id == "lora"


def test_round_robin_rotates():
    policy = make_policy("round_robin")
    got = [policy.choose(RequestView("m", text="x"), _replicas(3)).replica_id for _ in range(6)]
    assert got == ["r0", "r1", "r2", "r0", "r1", "r2"]


def test_power_of_two_picks_the_less_loaded_of_two():
    reps = [ReplicaStats("busy", in_flight=10), ReplicaStats("idle", in_flight=0)]
    policy = make_policy("power_of_two", seed=1)
    for _ in range(10):
        d = policy.choose(RequestView("m", text="x"), reps)
        assert (d.replica_id, d.reason) == ("idle", "least-load")


def test_session_is_sticky_and_spills_when_overloaded():
    policy = make_policy("session")
    reps = _replicas(4)
    req = RequestView("m", text="x", session_key="alice")
    first = policy.choose(req, reps)
    assert first.reason == "session-affinity"
    assert all(policy.choose(req, reps) == first for _ in range(5))
    loaded = [
        ReplicaStats(r.replica_id, in_flight=20 if r.replica_id == first.replica_id else 0)
        for r in reps
    ]
    spilled = policy.choose(req, loaded)
    assert spilled.replica_id != first.replica_id
    assert spilled.reason == "session-spill"
    assert policy.choose(RequestView("m", text="x"), reps).reason == "no-session-key"


def test_prefix_policy_follows_the_cached_prefix():
    policy = make_policy("prefix", block_size=4)
    shared = "system prompt " * 50
    reps = _replicas(4)
    first = policy.choose(RequestView("m", text=shared + "question one"), reps)
    assert first.reason == "least-load"
    second = policy.choose(RequestView("m", text=shared + "another question"), reps)
    assert second.replica_id == first.replica_id
    assert second.reason.startswith("prefix-match=")
    assert float(second.reason.split("=")[1]) > 0.8


def test_one_index_per_model():
    policy = make_policy("prefix", block_size=4)
    text = "same prompt " * 40
    policy.choose(RequestView("a", text=text), _replicas(2))
    d = policy.choose(RequestView("b", text=text), _replicas(2))
    assert d.reason == "least-load"


def test_scored_policy_reasons_and_hotspot_guard():
    policy = make_policy("scored", block_size=4)
    text = "shared context " * 60
    reps = _replicas(4)
    home = policy.choose(RequestView("m", text=text + "a"), reps).replica_id
    view = RequestView("m", text=text + "b")
    d = policy.choose(view, reps)
    assert d.replica_id == home and d.reason.startswith("prefix-match=")
    cached = len(text) // 16 * 4  # the shared text's full 4-token blocks
    assert d.reason == f"prefix-match={cached / view.prompt_tokens:.2f}"  # 0.99 of 226 tokens
    hot = [ReplicaStats(r.replica_id, in_flight=30 if r.replica_id == home else 1) for r in reps]
    d = policy.choose(RequestView("m", text=text + "c"), hot)
    assert d.replica_id != home
    assert d.reason == "hotspot-guard"


def test_chain_hashes_share_a_prefix_and_diverge_after():
    a = chain_hashes(list(range(64)), 16)
    b = chain_hashes([*range(40), 999, *range(41, 64)], 16)
    assert len(a) == 4 and a[:2] == b[:2] and a[2] != b[2] and a[3] != b[3]
    assert chain_hashes(list(range(15)), 16) == []
    assert chain_hashes("abcd" * 32, 16) == chain_hashes("abcd" * 32, 16)
    assert chain_hashes("abcd" * 32, 16, lora="x") != chain_hashes("abcd" * 32, 16)
    assert approx_tokens("abcd" * 8) == 8


def test_text_hashes_see_changes_in_the_high_bytes_of_words():
    # Bytes 7 and 15 are the top bytes of the block's first two 64-bit words: a plain
    # multiply-and-add hash keeps only their top 8 bits (at most 256 distinct values here).
    texts = {
        "a" * 7 + chr(x) + "a" * 7 + chr(y) + "a" * 48 for x in range(48, 88) for y in range(48, 88)
    }
    firsts = {chain_hashes(t, 16)[0] for t in texts}
    assert len(texts) == 1600 and len(firsts) == len(texts)


def test_text_hashes_depend_on_block_order():
    a, b = "x" * 64, "y" * 64
    assert chain_hashes(a + b, 16)[1] != chain_hashes(b + a, 16)[1]
    assert chain_hashes(a * 3, 16)[0] != chain_hashes(a * 3, 16)[1]


def test_hashes_are_stable_across_processes():
    code = (
        "from app.routing import chain_hashes;"
        "print(chain_hashes('abcd' * 64, 16)[-1], chain_hashes(list(range(64)), 16)[-1])"
    )
    runs = {
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        ).stdout
        for _ in range(2)
    }
    assert len(runs) == 1


def test_prefix_index_match_insert_remove():
    idx = PrefixIndex(max_blocks=10)
    idx.insert("a", [1, 2, 3, 4])
    idx.insert("b", [1, 2])
    assert idx.match([1, 2, 3, 9]) == {"a": 3, "b": 2}
    idx.remove("a", [3])
    assert idx.match([1, 2, 3]) == {"a": 2, "b": 2}
    idx.forget_replica("b")
    assert idx.match([1, 2]) == {"a": 2}
    assert idx.size() == 3


def test_chain_index_splits_runs_and_evicts_the_oldest_leaf():
    idx = ChainIndex(max_blocks=5)
    idx.insert("a", [1, 2, 3, 4])
    idx.insert("a", [1, 2, 5])  # diverges inside the first run: split after block 2
    assert idx.match([1, 2, 3, 4]) == {"a": 4}
    assert idx.match([1, 2, 5, 6]) == {"a": 3}
    assert idx.blocks("a") == [4, 3, 5, 2, 1]
    idx.insert("a", [7, 8])  # two over the bound: blocks 4 then 3 go (the oldest leaf run)
    assert idx.match([1, 2, 3, 4]) == {"a": 2}
    assert idx.size("a") == 5


def test_prefix_index_evicts_children_before_parents():
    idx = PrefixIndex(max_blocks=4)
    idx.insert("a", [1, 2, 3])
    idx.insert("a", [7, 8])
    assert idx.size("a") == 4
    assert idx.match([1, 2, 3]) == {"a": 2}  # block 3, the oldest child, went first


def test_kv_policy_uses_engine_events_only():
    policy = make_policy("kv", block_size=4)
    reps = _replicas(3)
    tokens = list(range(100, 132))
    req = RequestView("m", token_ids=tokens)
    first = policy.choose(req, reps)
    assert first.reason == "least-load"
    policy.on_complete(req, first.replica_id)  # done, and no engine reported its blocks
    again = policy.choose(req, reps)
    assert again.reason == "least-load"  # its own decisions are not recorded in the index
    policy.on_complete(req, again.replica_id)
    policy.on_kv_event("m", "r2", BlockStored([11, 12], None, tokens[:8], 4))
    policy.on_kv_event("m", "r2", BlockStored([13, 14], 12, tokens[8:16], 4))
    d = policy.choose(req, reps)
    assert (d.replica_id, d.reason) == ("r2", "kv-match=0.50")
    policy.on_complete(req, d.replica_id)
    policy.on_kv_event("m", "r2", BlockRemoved([13, 14]))
    assert policy.index("m").match(req.block_hashes(4)) == {"r2": 2}
    policy.on_kv_event("m", "r2", AllBlocksCleared())
    assert policy.index("m").match(req.block_hashes(4)) == {}
    assert policy.choose(req, reps).reason == "least-load"


def test_scored_tracks_outstanding_prefill_work():
    policy = make_policy("scored", block_size=4)
    reps = [ReplicaStats("r0", in_flight=1), ReplicaStats("r1", in_flight=1)]
    req = RequestView("m", text="new content " * 40)
    rid = policy.choose(req, reps).replica_id
    assert policy.outstanding_work("m", rid) > 0
    policy.on_first_token(req, rid)
    assert policy.outstanding_work("m", rid) == 0
    policy.on_complete(req, rid)  # a second report changes nothing
    assert policy.outstanding_work("m", rid) == 0


def test_forget_replica_drops_its_index_and_state():
    policy = make_policy("scored", block_size=4)
    text = "context " * 50
    rid = policy.choose(RequestView("m", text=text), _replicas(2)).replica_id
    assert policy.outstanding_work("m", rid) > 0
    policy.forget_replica(rid)
    assert policy.index("m").size(rid) == 0
    assert policy.outstanding_work("m", rid) == 0
    assert policy.choose(RequestView("m", text=text), _replicas(2)).reason == "least-load"
