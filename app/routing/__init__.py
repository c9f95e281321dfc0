"""Replica choice for one model's engine replicas. Pure Python: no Ray or FastAPI imports.

`make_policy(name, **settings)` builds a policy; `policy.choose(request, candidates)` returns a
`Decision` (replica id, policy, reason such as `prefix-match=0.83`, the chosen replica's match,
and a `RouteReceipt` when the view asks for one). `view_of_body` reads an OpenAI request body as
the `RequestView` the policies take.

Modules: `types` (the protocol and value types), `policies/` (one module per policy and the
registry), `prefix_match` (the match-ratio rule), `index` (prefix indexes), `tokens` (block
hashes), `kv_events` (engine KV cache events), `request_view` (request bodies as views),
`receipts` (route receipts).
"""

from app.routing.index import ChainIndex, PrefixIndex
from app.routing.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KvEvent
from app.routing.policies import (
    DEFAULT_POLICY,
    POLICY_NAMES,
    HotspotGuard,
    KvPolicy,
    PowerOfTwoPolicy,
    PrefixPolicy,
    RoundRobinPolicy,
    ScoredPolicy,
    ScoredWeights,
    SessionPolicy,
    make_policy,
    uses_kv_events,
)
from app.routing.prefix_match import MATCH_REASONS, match_ratios, match_reason
from app.routing.receipts import CandidateReceipt, RouteReceipt
from app.routing.request_view import prompt_text, render_messages, view_of_body
from app.routing.tokens import DEFAULT_BLOCK_SIZE, approx_tokens, chain_hashes
from app.routing.types import Decision, NoReplicaError, Policy, ReplicaStats, RequestView

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "DEFAULT_POLICY",
    "MATCH_REASONS",
    "POLICY_NAMES",
    "AllBlocksCleared",
    "BlockRemoved",
    "BlockStored",
    "CandidateReceipt",
    "ChainIndex",
    "Decision",
    "HotspotGuard",
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
    "RouteReceipt",
    "ScoredPolicy",
    "ScoredWeights",
    "SessionPolicy",
    "approx_tokens",
    "chain_hashes",
    "make_policy",
    "match_ratios",
    "match_reason",
    "prompt_text",
    "render_messages",
    "uses_kv_events",
    "view_of_body",
]
