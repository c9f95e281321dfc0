"""Policies by name."""

from __future__ import annotations

from typing import Any

from app.routing.policies import (
    KvPolicy,
    PowerOfTwoPolicy,
    PrefixPolicy,
    RoundRobinPolicy,
    SessionPolicy,
)
from app.routing.scored import ScoredPolicy
from app.routing.types import Policy

POLICIES: dict[str, type] = {
    "round_robin": RoundRobinPolicy,
    "power_of_two": PowerOfTwoPolicy,
    "session": SessionPolicy,
    "prefix": PrefixPolicy,
    "kv": KvPolicy,
    "scored": ScoredPolicy,
}
POLICY_NAMES: tuple[str, ...] = tuple(POLICIES)
DEFAULT_POLICY = "scored"


def make_policy(name: str = DEFAULT_POLICY, **settings: Any) -> Policy:
    """A new policy by name; settings go to its constructor."""
    cls = POLICIES.get(name)
    if cls is None:
        raise ValueError(f"unknown routing policy {name!r}; allowed: {', '.join(POLICY_NAMES)}")
    return cls(**settings)
