"""Replica choice for one model's engine replicas. Pure Python: no Ray or FastAPI imports.

`make_policy(name, **settings)` builds a policy; `policy.choose(request, candidates)` returns a
`Decision` (replica id, policy, reason such as `prefix-match=0.83`).
"""

from app.routing.counts import DecisionCounts
from app.routing.index import ChainIndex, PrefixIndex
from app.routing.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KvEvent
from app.routing.policies import (
    KvPolicy,
    PowerOfTwoPolicy,
    PrefixPolicy,
    RoundRobinPolicy,
    SessionPolicy,
)
from app.routing.registry import DEFAULT_POLICY, POLICY_NAMES, make_policy
from app.routing.scored import ScoredPolicy
from app.routing.tokens import DEFAULT_BLOCK_SIZE, approx_tokens, chain_hashes
from app.routing.types import Decision, NoReplicaError, Policy, ReplicaStats, RequestView

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "DEFAULT_POLICY",
    "POLICY_NAMES",
    "AllBlocksCleared",
    "BlockRemoved",
    "BlockStored",
    "ChainIndex",
    "Decision",
    "DecisionCounts",
    "KvEvent",
    "KvPolicy",
    "NoReplicaError",
    "Policy",
    "PowerOfTwoPolicy",
    "PrefixIndex",
    "PrefixPolicy",
    "ReplicaStats",
    "RequestView",
    "RoundRobinPolicy",
    "ScoredPolicy",
    "SessionPolicy",
    "approx_tokens",
    "chain_hashes",
    "make_policy",
]
