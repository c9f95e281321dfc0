"""An engine replica's scheduler state, for routing and metrics.

`EngineStats` implements vLLM's stat-logger interface (`record(scheduler_stats,
iteration_stats, ...)`, see `vllm.v1.metrics.loggers.StatLoggerBase`) and keeps the latest
scheduler state: running and waiting requests, KV-cache usage, prefix-cache queries and hits.
`EngineServer.record_routing_stats` reports `EngineStats.as_dict()`; Ray Serve carries it to every
request router of the deployment as `RunningReplica.routing_stats`.

No Ray or vLLM imports here: plain Python.
"""

from __future__ import annotations

from collections import deque
from typing import Any


class EngineStats:
    """The latest scheduler state of one vLLM engine (a vLLM stat logger; cheap to feed).

    `prefix_cache_hit_rate` is over the last `window` scheduler updates that queried the cache
    (hits / queried tokens), like vLLM's own logged hit rate; `prefix_cache_queries` and
    `prefix_cache_hits` are totals since the engine started (tokens).
    """

    def __init__(self, window: int = 256) -> None:
        self._engines: dict[int, tuple[int, int, float]] = {}  # engine index -> state
        self._recent: deque[tuple[int, int]] = deque(maxlen=window)
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0
        self.updates = 0

    # -- vLLM's StatLoggerBase interface ---------------------------------------------------
    def record(
        self,
        scheduler_stats: Any,
        iteration_stats: Any,
        mm_cache_stats: Any = None,
        engine_idx: int = 0,
    ) -> None:
        if scheduler_stats is None:
            return
        self.updates += 1
        self._engines[engine_idx] = (
            int(getattr(scheduler_stats, "num_running_reqs", 0)),
            int(getattr(scheduler_stats, "num_waiting_reqs", 0)),
            float(getattr(scheduler_stats, "kv_cache_usage", 0.0)),
        )
        prefix = getattr(scheduler_stats, "prefix_cache_stats", None)
        if prefix is None:
            return
        if getattr(prefix, "reset", False):
            self._recent.clear()
        queries, hits = int(prefix.queries), int(prefix.hits)
        if queries:
            self.prefix_cache_queries += queries
            self.prefix_cache_hits += hits
            self._recent.append((queries, hits))

    def log(self) -> None:
        pass

    def log_engine_initialized(self) -> None:
        pass

    def record_sleep_state(self, *args: Any, **kwargs: Any) -> None:
        pass

    # -- reading ------------------------------------------------------------------------------
    @property
    def running(self) -> int:
        return sum(s[0] for s in self._engines.values())

    @property
    def waiting(self) -> int:
        return sum(s[1] for s in self._engines.values())

    @property
    def kv_usage(self) -> float:
        states = list(self._engines.values())
        return sum(s[2] for s in states) / len(states) if states else 0.0

    @property
    def prefix_cache_hit_rate(self) -> float:
        recent = list(self._recent)
        queries = sum(q for q, _ in recent)
        return sum(h for _, h in recent) / queries if queries else 0.0

    def as_dict(self) -> dict[str, Any]:
        """The routing-stats entries (`queued` is the engine's waiting queue)."""
        return {
            "running": self.running,
            "queued": self.waiting,
            "kv_usage": round(self.kv_usage, 6),
            "prefix_cache_queries": self.prefix_cache_queries,
            "prefix_cache_hits": self.prefix_cache_hits,
            "prefix_cache_hit_rate": round(self.prefix_cache_hit_rate, 6),
        }
