"""The routing policies, one module each, behind the `app.routing.types.Policy` protocol.

`base` holds what they share (eligible replicas, no-op hooks, a prefix index per model);
`registry` builds them by name.
"""

from app.routing.policies.base import IndexedPolicy, PolicyBase, eligible, pending
from app.routing.policies.kv import KvPolicy
from app.routing.policies.power_of_two import PowerOfTwoPolicy
from app.routing.policies.prefix import PrefixPolicy
from app.routing.policies.registry import (
    DEFAULT_POLICY,
    POLICY_NAMES,
    make_policy,
    uses_kv_events,
)
from app.routing.policies.round_robin import RoundRobinPolicy
from app.routing.policies.scored import ScoredPolicy
from app.routing.policies.scored_settings import HotspotGuard, ScoredWeights
from app.routing.policies.session import SessionPolicy

__all__ = [
    "DEFAULT_POLICY",
    "POLICY_NAMES",
    "HotspotGuard",
    "IndexedPolicy",
    "KvPolicy",
    "PolicyBase",
    "PowerOfTwoPolicy",
    "PrefixPolicy",
    "RoundRobinPolicy",
    "ScoredPolicy",
    "ScoredWeights",
    "SessionPolicy",
    "eligible",
    "make_policy",
    "pending",
    "uses_kv_events",
]
