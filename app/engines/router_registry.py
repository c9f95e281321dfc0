"""The request routers of this (ingress) process, by model: how the ingress reaches them.

Each `StackRequestRouter` registers itself here under its model; `snapshot()` reads the replicas
each router currently sees with their last reported stats (for /metrics and /status), and
`first_token()` passes the ingress's first-token notes to the routers. (Serve pickles the router
module by value, so its own globals are not shared with the ingress; this module is imported by
reference, so its registry is.) Plain Python: no Ray or vLLM imports.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

_lock = threading.Lock()
_routers: dict[str, weakref.WeakSet] = {}


def register(model: str, router: Any) -> None:
    """Called by each request router (in the calling process) for its model."""
    with _lock:
        _routers.setdefault(model, weakref.WeakSet()).add(router)


def first_token(model: str, request_id: str) -> None:
    """Tell the model's routers that a request they routed got its first item (any thread)."""
    with _lock:
        found = list(_routers.get(model, ()))
    for router in found:
        router.first_token(request_id)


def snapshot() -> dict[str, dict[str, dict[str, Any]]]:
    """model -> replica id -> last reported stats, for every replica the routers see.

    Empty for a model until its router exists (Serve creates it on the first request)."""
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


def forget_all() -> None:
    """For tests."""
    with _lock:
        _routers.clear()
