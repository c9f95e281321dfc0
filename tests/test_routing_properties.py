"""Property tests (hypothesis) of the routing policies and the prefix index."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from app.routing import (
    POLICY_NAMES,
    ChainIndex,
    PrefixIndex,
    ReplicaStats,
    RequestView,
    SessionPolicy,
    make_policy,
)

KEYS = [f"session-{i}" for i in range(400)]
EPS = 0.1


def _owners(policy: SessionPolicy, ids: list[str]) -> dict[str, str]:
    reps = [ReplicaStats(i) for i in ids]
    return {k: policy.choose(RequestView("m", session_key=k), reps).replica_id for k in KEYS}


@settings(max_examples=15, deadline=None)
@given(n=st.integers(2, 10), prefix=st.sampled_from(["r", "replica-", "10.0.0."]))
def test_adding_a_replica_remaps_at_most_its_share(n, prefix):
    policy = SessionPolicy()
    ids = [f"{prefix}{i}" for i in range(n)]
    before = _owners(policy, ids)
    after = _owners(policy, [*ids, f"{prefix}new"])
    moved = sum(before[k] != after[k] for k in KEYS) / len(KEYS)
    assert moved <= 1 / (n + 1) + EPS
    assert all(after[k] == f"{prefix}new" for k in KEYS if before[k] != after[k])


@settings(max_examples=15, deadline=None)
@given(n=st.integers(2, 10), gone=st.integers(0, 9))
def test_removing_a_replica_remaps_at_most_its_share(n, gone):
    policy = SessionPolicy()
    ids = [f"r{i}" for i in range(n)]
    victim = ids[gone % n]
    before = _owners(policy, ids)
    after = _owners(policy, [i for i in ids if i != victim])
    moved = sum(before[k] != after[k] for k in KEYS) / len(KEYS)
    assert moved <= 1 / n + EPS
    assert all(before[k] == victim for k in KEYS if before[k] != after[k])


@settings(max_examples=40, deadline=None)
@given(
    bound=st.integers(1, 50),
    ops=st.lists(
        st.tuples(
            st.sampled_from(["a", "b", "c"]),
            st.booleans(),
            st.lists(st.integers(0, 200), min_size=0, max_size=80),
        ),
        max_size=40,
    ),
)
def test_prefix_index_stays_within_its_bound(bound, ops):
    idx = PrefixIndex(bound)
    for replica, insert, hashes in ops:
        if insert:
            idx.insert(replica, hashes)
        else:
            idx.remove(replica, hashes)
        for r in ("a", "b", "c"):
            assert idx.size(r) <= bound
    for r in ("a", "b", "c"):
        for h in idx.blocks(r):
            assert r in idx.holders(h)


# A random tree of chains: each chain extends a prefix of an earlier one by fresh blocks.
chain_trees = st.lists(
    st.tuples(st.integers(0, 1000), st.floats(0, 1), st.integers(0, 12), st.sampled_from("ab")),
    max_size=60,
)


@settings(max_examples=200, deadline=None)
@given(bound=st.integers(1, 40), steps=chain_trees)
def test_chain_index_holds_exactly_what_the_block_lru_holds(bound, steps):
    chains: list[list[int]] = [[]]
    fresh = iter(range(10**6, 2 * 10**6))
    exact, fast = PrefixIndex(bound), ChainIndex(bound)
    for pick, cut, extra, replica in steps:
        base = chains[pick % len(chains)]
        chain = base[: round(cut * len(base))] + [next(fresh) for _ in range(extra)]
        chains.append(chain)
        exact.insert(replica, chain)
        fast.insert(replica, chain)
        for r in "ab":
            assert fast.blocks(r) == exact.blocks(r)
            assert fast.size(r) == exact.size(r) <= bound
        probe = chains[(pick * 7 + extra) % len(chains)]
        assert fast.match(probe) == exact.match(probe)
        leaving = [*probe[: len(probe) // 2], -1]  # leaves the tree inside a node
        assert fast.match(leaving) == exact.match(leaving)


replica_sets = st.lists(
    st.tuples(st.booleans(), st.integers(0, 40), st.integers(0, 5), st.floats(0, 1)),
    min_size=1,
    max_size=8,
)


@settings(max_examples=30, deadline=None)
@given(
    name=st.sampled_from(POLICY_NAMES),
    rounds=st.lists(replica_sets, min_size=1, max_size=10),
    texts=st.lists(
        st.sampled_from(["alpha " * 30, "beta " * 40, "alpha " * 30 + "x", ""]), min_size=1
    ),
)
def test_unhealthy_replica_is_never_chosen(name, rounds, texts):
    policy = (
        make_policy(name, block_size=4) if name in ("prefix", "kv", "scored") else make_policy(name)
    )
    for i, spec in enumerate(rounds):
        reps = [
            ReplicaStats(f"r{j}", healthy=h, in_flight=f, queued=q, kv_usage=kv)
            for j, (h, f, q, kv) in enumerate(spec)
        ]
        if not any(r.healthy for r in reps):
            continue
        req = RequestView("m", text=texts[i % len(texts)], session_key=f"s{i % 3}")
        chosen = policy.choose(req, reps).replica_id
        assert next(r for r in reps if r.replica_id == chosen).healthy
