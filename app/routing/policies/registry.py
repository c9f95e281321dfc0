"""Policies by name: `make_policy`, `POLICY_NAMES`, `DEFAULT_POLICY`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from app.routing.policies.kv import KvPolicy
from app.routing.policies.power_of_two import PowerOfTwoPolicy
from app.routing.policies.prefix import PrefixPolicy
from app.routing.policies.round_robin import RoundRobinPolicy
from app.routing.policies.scored import ScoredPolicy
from app.routing.policies.session import SessionPolicy
from app.routing.types import Policy

# Each takes a policy's settings as flat keywords (as serve configs give them).
POLICIES: dict[str, Callable[..., Policy]] = {
    "round_robin": RoundRobinPolicy,
    "power_of_two": PowerOfTwoPolicy,
    "session": SessionPolicy,
    "prefix": PrefixPolicy,
    "kv": KvPolicy,
    "scored": ScoredPolicy.from_settings,
}
POLICY_NAMES: tuple[str, ...] = tuple(POLICIES)
DEFAULT_POLICY = "scored"


def make_policy(name: str = DEFAULT_POLICY, **settings: Any) -> Policy:
    """A new policy by name; settings go to its constructor (TypeError if they do not fit)."""
    factory = POLICIES.get(name)
    if factory is None:
        raise ValueError(f"unknown routing policy {name!r}; allowed: {', '.join(POLICY_NAMES)}")
    return factory(**settings)


def uses_kv_events(name: str, **settings: Any) -> bool:
    """Whether the named policy routes from the engines' KV cache events."""
    return bool(getattr(make_policy(name, **settings), "kv_events", False))
