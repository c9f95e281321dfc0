"""The request routers of this (ingress) process, by model: how the ingress reaches them.

Each `StackRequestRouter` registers itself here under its model when Serve creates it (right
after the ingress makes its handle to the model's engine deployment). The ingress asks `get()`
for a model's router to route its HTTP requests (`EngineRoutes`), and `snapshot()` reads the
replicas the routers see with their last reported stats (for /metrics and /status). (Serve
pickles the router module by value, so its own globals are not shared with the ingress; this
module is imported by reference, so its registry is.) Plain Python: no Ray or vLLM imports.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Collection
from typing import Any, Protocol

_lock = threading.Lock()
_routers: dict[str, weakref.WeakSet] = {}


class EngineRoutes(Protocol):
    """What the ingress asks of a model's router (`app.engines.router.StackRequestRouter`)."""

    def route(self, view: Any, exclude: Collection[str] = (), *, slots: float | None = None) -> Any:
        """A `Routed` replica for the request (none of `exclude`; one to which this router has
        fewer than `slots` requests in flight, when any is), or None."""
        ...

    def first_token(self, routed: Any) -> None:
        """The routed request's answer started."""
        ...

    def finish(self, routed: Any) -> None:
        """The routed request ended."""
        ...

    def replica_count(self) -> int:
        """Running replicas that can take requests."""
        ...

    @property
    def replicas_known(self) -> bool:
        """Whether Serve has told the router the running replicas (none, maybe) yet."""
        ...


def register(model: str, router: Any) -> None:
    """Called by each request router (in the calling process) for its model."""
    with _lock:
        _routers.setdefault(model, weakref.WeakSet()).add(router)


def get(model: str) -> EngineRoutes | None:
    """A router of the model in this process (one that sees replicas, if any does)."""
    with _lock:
        found = list(_routers.get(model, ()))
    return max(found, key=lambda router: router.replica_count(), default=None)


def snapshot() -> dict[str, dict[str, dict[str, Any]]]:
    """model -> replica id -> last reported stats, for every replica the routers see.

    Empty for a model until its router exists."""
    with _lock:
        routers = {model: list(found) for model, found in _routers.items()}
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for model, found in routers.items():
        replicas = out.setdefault(model, {})
        for router in found:
            try:
                current = list(router.curr_replicas.values())
            except Exception:  # a router being torn down
                continue
            for replica in current:
                replicas[replica.replica_id.unique_id] = dict(replica.routing_stats or {})
    return out


def kv_counts() -> dict[str, dict[str, int]]:
    """model -> what its routers' KV event feeds have done (`kv_feed.FeedCounts`, summed);
    only models whose policy reads KV cache events."""
    with _lock:
        routers = {model: list(found) for model, found in _routers.items()}
    out: dict[str, dict[str, int]] = {}
    for model, found in routers.items():
        for router in found:
            counts = router.kv_counts()
            if counts is None:
                continue
            total = out.setdefault(model, {})
            for name in counts.__slots__:
                total[name] = total.get(name, 0) + getattr(counts, name)
    return out


def forget_all() -> None:
    """For tests."""
    with _lock:
        _routers.clear()
