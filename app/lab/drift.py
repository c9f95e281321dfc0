"""Index drift: how far a router's prefix index is from the simulated engines' true caches.

A policy with a prefix index in the router's hash space (`prefix` and `scored` predict it from
their own decisions; `kv` builds it from the engines' KV events) believes each replica holds
some blocks. Sampled just before every `every`-th decision, over all replicas together:

- **stale**: the share of the index's (replica, block) entries whose replica does not hold the
  block (evicted, never stored, or, for a prediction, still in a prefill);
- **missing**: the share of the replicas' cached blocks that the index does not know of.

The figures are the mean over the samples and the last sample (the end of the replay).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass

from app.lab.simulator import SimulatedReplica
from app.routing.prefix_match import BlockIndex


@dataclass(frozen=True, slots=True)
class DriftSample:
    """One sample: (replica, block) entries in the index and those stale; cached blocks in the
    replicas and those the index misses."""

    indexed: int
    stale: int
    cached: int
    missing: int

    @property
    def stale_share(self) -> float:
        return self.stale / self.indexed if self.indexed else 0.0

    @property
    def missing_share(self) -> float:
        return self.missing / self.cached if self.cached else 0.0


def drift_sample(indexes: Iterable[BlockIndex], sims: Sequence[SimulatedReplica]) -> DriftSample:
    """Compare the indexes (one per model, taken together) with the replicas' caches."""
    indexes = list(indexes)
    indexed = stale = cached = missing = 0
    for sim in sims:
        known: set[int] = set()
        for index in indexes:
            known.update(index.blocks(sim.replica_id))
        cache = sim.cache
        indexed += len(known)
        stale += sum(1 for h in known if h not in cache)
        cached += len(cache)
        missing += sum(1 for h in cache if h not in known)
    return DriftSample(indexed, stale, cached, missing)


@dataclass(frozen=True, slots=True)
class IndexDrift:
    """The drift figures of one replay (shares from 0 to 1)."""

    samples: int
    stale_mean: float
    missing_mean: float
    stale_end: float
    missing_end: float

    def to_json(self) -> dict[str, float | int]:
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(self).items()}


class DriftProbe:
    """A replay observer (`replay(..., observe=...)`): a drift sample of `indexes()` against the
    replicas just before every `every`-th decision."""

    def __init__(self, indexes: Callable[[], Iterable[BlockIndex]], every: int = 1) -> None:
        if every < 1:
            raise ValueError("drift samples are taken every 1 or more decisions")
        self._indexes = indexes
        self.every = every
        self.samples: list[DriftSample] = []
        self._decisions = 0

    def __call__(self, sims: Sequence[SimulatedReplica]) -> None:
        self._decisions += 1
        if (self._decisions - 1) % self.every == 0:
            self.samples.append(drift_sample(self._indexes(), sims))

    def result(self) -> IndexDrift:
        n = len(self.samples)
        if not n:
            return IndexDrift(0, 0.0, 0.0, 0.0, 0.0)
        last = self.samples[-1]
        return IndexDrift(
            n,
            sum(x.stale_share for x in self.samples) / n,
            sum(x.missing_share for x in self.samples) / n,
            last.stale_share,
            last.missing_share,
        )
