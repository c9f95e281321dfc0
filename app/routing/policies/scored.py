"""The default policy: weighted prefix, load, queue and KV-utilisation scores, hotspot-guarded."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from app.routing.policies.base import IndexedPolicy, eligible
from app.routing.policies.scored_settings import (
    HotspotGuard,
    ScoredWeights,
    Terms,
    split_settings,
)
from app.routing.prefix_match import MATCH_REASONS, match_ratios, match_reason
from app.routing.receipts import TERMS, RouteReceipt, build_receipt
from app.routing.tokens import DEFAULT_BLOCK_SIZE
from app.routing.types import Decision, ReplicaStats, RequestView


@dataclass(slots=True)
class ReplicaLoad:
    """What the policy keeps about one replica of a model.

    `pressure` (the new, uncached blocks sent there) and `share` (the requests sent there) are
    moving averages kept inflated by the model's gain (`ModelLoads`); `work` is the uncached
    blocks of the requests sent there whose first token or completion is not reported yet.
    """

    pressure: float = 0.0
    share: float = 0.0
    work: float = 0.0


@dataclass(slots=True)
class ModelLoads:
    """One model's replica loads, and the gain inflating their moving averages: decaying every
    replica is one multiplication of the gain (renormalised when it grows large)."""

    replicas: dict[str, ReplicaLoad] = field(default_factory=dict)
    gain: float = 1.0


# Step 2's hotspot limits and step 3's ranges over the eligible replicas, a plain tuple (made
# once a decision): mean in-flight plus queued, the limits above which a replica is a load,
# pressure or share hotspot, and the least and the spread of in-flight plus queued and of
# pressure.
Bounds = tuple[float, float, float, float, int, int, float, float]
# An eligible replica's stats, in-flight plus queued, load, match ratio and pressure (read once).
Row = tuple[ReplicaStats, int, ReplicaLoad, float, float]


class ScoredPolicy(IndexedPolicy):
    """Best weighted score among replicas that are neither load nor cache hotspots.

    1. Keep the eligible replicas (healthy; for a LoRA request, its adapter's holders with
       room, when any).
    2. Hotspot guard (`HotspotGuard`), with means over the eligible replicas (never drops them
       all): drop
       a. replicas whose in-flight plus queued count exceeds both `mean * hotspot_rel` and
          `mean + hotspot_abs`;
       b. replicas whose cache pressure (a moving average of the new, uncached blocks this
          policy sent them) exceeds both `mean * pressure_rel` and `mean + pressure_abs`
          (default: a quarter of `max_blocks`);
       c. replicas busier than the mean whose share of recent requests (a moving average)
          exceeds both `mean * share_rel` and `mean + share_abs`.
    3. Score each remaining replica (weights: `ScoredWeights`):
       `w_prefix * match - w_load * load - w_queue * queued/max_concurrency - w_kv * kv_usage
       - w_pressure * pressure - w_work * work / prompt_blocks`, where `match` is the share of
       the prompt in the replica's cached prefix (the policy's own LRU index of chained block
       hashes, bounded like an engine), `load` and `pressure` are scaled from 0 (least among
       the replicas) to 1 (most), and
       `work` is the uncached blocks of the requests this policy sent there whose first token
       (`on_first_token`) or completion (`on_complete`) has not been reported yet: the prefill
       queued ahead (reset when the replica reports nothing in flight).
       When no replica holds `cold_match` of the prompt (mostly new content, e.g. a new
       conversation after a shared system prompt), `w_prefix` is scaled by `cold_prefix_scale`
       and `w_pressure` by `cold_pressure_scale`: new content goes where the least new content
       went lately (as SGLang's smallest-tree rule), so prefix groups spread evenly and later
       requests of a group need not be split off a crowded replica.
    4. Pick the highest score; ties go to the fewest in-flight plus queued, then in turn.
    5. Record the prompt's blocks under the chosen replica; add its new blocks to the replica's
       pressure and outstanding work, and the request to its share.
    Reasons: `prefix-match=<ratio>` when the chosen replica had a cached prefix,
    `hotspot-guard` when a better-matching replica was skipped as a hotspot, else `least-load`.
    `make_policy("scored", **settings)` takes the weights and guard settings as flat keywords.
    """

    name = "scored"
    reasons: Sequence[str] = MATCH_REASONS  # the match reasons by ratio (`match_reason`)

    def __init__(
        self,
        block_size: int = DEFAULT_BLOCK_SIZE,
        max_blocks: int = 100_000,
        weights: ScoredWeights | None = None,
        guard: HotspotGuard | None = None,
    ) -> None:
        super().__init__(block_size, max_blocks)
        self.weights = weights if weights is not None else ScoredWeights()
        self.guard = guard = guard if guard is not None else HotspotGuard()
        self._pressure_abs = max_blocks / 4 if guard.pressure_abs is None else guard.pressure_abs
        self._decay = 1.0 - 1.0 / max(1, guard.pressure_window)
        self._warm, self._cold = self.weights.terms(cold=False), self.weights.terms(cold=True)
        self._models: defaultdict[str, ModelLoads] = defaultdict(ModelLoads)
        self._open: dict[int, tuple[ReplicaLoad, int]] = {}  # id(request) -> work added
        self._turn = 0

    @classmethod
    def from_settings(
        cls, block_size: int = DEFAULT_BLOCK_SIZE, max_blocks: int = 100_000, **settings: Any
    ) -> ScoredPolicy:
        """A policy from flat keyword settings (weights and guard fields by name)."""
        return cls(block_size, max_blocks, *split_settings(settings))

    def on_first_token(self, request: RequestView, replica_id: str) -> None:
        """The request's prefill is done: take its uncached blocks off the outstanding work."""
        self.on_complete(request, replica_id)

    def on_complete(self, request: RequestView, replica_id: str) -> None:
        """Take the request's uncached blocks off the replica's outstanding work (if still on)."""
        opened = self._open.pop(id(request), None)
        if opened is not None:
            load, blocks = opened
            load.work = max(0.0, load.work - blocks)

    def outstanding_work(self, model: str, replica_id: str) -> float:
        """Uncached blocks sent to the replica whose prefill has not been reported done."""
        loads = self._models.get(model)
        load = loads.replicas.get(replica_id) if loads is not None else None
        return load.work if load is not None else 0.0

    def forget_replica(self, replica_id: str) -> None:
        super().forget_replica(replica_id)
        for loads in self._models.values():
            loads.replicas.pop(replica_id, None)

    def choose(self, request: RequestView, candidates: Sequence[ReplicaStats]) -> Decision:
        pool = eligible(request, candidates)
        ratios = self._match(request, pool)
        loads = self._models[request.model]
        rows = self._gather(pool, ratios, loads.replicas)
        bounds = self._bounds(rows, loads.gain)
        terms = self._cold if max(ratios) < self.weights.cold_match else self._warm
        blocks = request.prompt_tokens / self.block_size
        (replica, _, load, ratio, _), skipped = self._pick(rows, bounds, terms, max(blocks, 1))
        reason = self._reason(ratio, skipped)
        receipt = (  # before step 5 changes the loads it reads
            self._receipt(request, rows, bounds, terms, replica.replica_id, reason)
            if request.receipt
            else None
        )
        hashes = request.block_hashes(self.block_size)
        new_blocks = len(hashes) - round(ratio * request.prompt_tokens / self.block_size)
        self._account(request, loads, load, max(0, new_blocks))
        self._record(request, replica.replica_id, hashes)
        return Decision(replica.replica_id, self.name, reason, ratio, receipt)

    def _receipt(
        self,
        request: RequestView,
        rows: list[Row],
        bounds: Bounds,
        terms: Terms,
        replica_id: str,
        reason: str,
    ) -> RouteReceipt:
        """The decision's receipt: each row's score and terms as step 3 computes them, and
        whether step 2 sets it aside as a hotspot (with the full guard: the pick relaxes the
        guard only when it sets every replica aside)."""
        mean, limit, p_limit, s_limit, lo, span, p_lo, p_span = bounds
        blocks = max(request.prompt_tokens / self.block_size, 1)
        scores = []
        for c, busy, load, ratio, pressure in rows:
            hot = busy > limit or pressure > p_limit or (load.share > s_limit and busy > mean)
            parts = dict(zip(TERMS, (
                terms[0] * ratio,
                -terms[1] * (busy - lo) / span if span else 0.0,
                -terms[2] * c.queued / max(1, c.max_concurrency),
                -terms[3] * c.kv_usage,
                -terms[4] * (pressure - p_lo) / p_span if p_span else 0.0,
                -terms[5] * load.work / blocks,
            ), strict=True))  # fmt: skip
            scores.append((sum(parts.values()), parts, hot))
        pool = [row[0] for row in rows]
        return build_receipt(self.name, replica_id, reason, request, pool,
                             [row[3] for row in rows], block_size=self.block_size,
                             scores=scores)  # fmt: skip

    def _match(self, request: RequestView, pool: Sequence[ReplicaStats]) -> list[float]:
        """Step 3's `match`: each replica's share of the prompt in its cached prefix, from the
        policy's own index of its decisions."""
        return match_ratios(self.index(request.model), request, pool, self.block_size)

    def _record(self, request: RequestView, replica_id: str, hashes: Sequence[int]) -> None:
        """Step 5's record: the prompt's blocks under the chosen replica, in the index."""
        self.index(request.model).insert(replica_id, hashes)

    @staticmethod
    def _gather(
        pool: Sequence[ReplicaStats], ratios: Sequence[float], replicas: dict[str, ReplicaLoad]
    ) -> list[Row]:
        """Each eligible replica's row: stats, in-flight plus queued, load, match ratio and
        pressure. A replica with nothing in flight has no outstanding work (self-healing when
        completions go unreported)."""
        rows = []
        for c, ratio in zip(pool, ratios, strict=False):  # equal lengths
            load = replicas.get(c.replica_id)
            if load is None:
                load = replicas[c.replica_id] = ReplicaLoad()
            busy = c.in_flight + c.queued
            if not busy:
                load.work = 0.0
            rows.append((c, busy, load, ratio, load.pressure))
        return rows

    def _bounds(self, rows: list[Row], gain: float) -> Bounds:
        """Step 2's limits (each the larger of its relative and absolute bound over the mean;
        absolute pressure and share bounds inflated by the gain, as the averages are) and the
        load and pressure ranges that scale step 3's terms."""
        total = p_total = s_total = 0.0
        lo = hi = rows[0][1]
        p_lo = p_hi = rows[0][4]
        # One pass: sums (in pool order, one addition at a time) and ranges, compared inline
        # (builtin min and max over the columns as lists cost ~1 us more a decision).
        for _, busy, load, _, pressure in rows:
            total += busy
            p_total += pressure
            s_total += load.share
            if busy < lo:
                lo = busy
            elif busy > hi:
                hi = busy
            if pressure < p_lo:
                p_lo = pressure
            elif pressure > p_hi:
                p_hi = pressure
        n, guard = len(rows), self.guard
        mean, p_mean, s_mean = total / n, p_total / n, s_total / n
        return (
            mean,
            max(mean * guard.hotspot_rel, mean + guard.hotspot_abs),
            max(p_mean * guard.pressure_rel, p_mean + self._pressure_abs * gain),
            max(s_mean * guard.share_rel, s_mean + guard.share_abs * gain),
            lo,
            hi - lo,
            p_lo,
            p_hi - p_lo,
        )

    def _pick(
        self, rows: list[Row], bounds: Bounds, terms: Terms, blocks: float
    ) -> tuple[Row, bool]:
        """Steps 2 to 4: the best row the guard allows, taking the rows in turn from the next
        replica on (the last tie-break), and whether a replica with a cached prefix was skipped
        as a hotspot. The guard drops load, pressure and share hotspots; if that drops all,
        load hotspots only; if that drops all, none."""
        self._turn += 1
        k = self._turn % len(rows)
        if k:
            rows = rows[k:] + rows[:k]
        for level in (2, 1, 0):
            chosen, skipped = self._best(rows, bounds, terms, blocks, level)
            if chosen is not None:
                return chosen, skipped
        raise AssertionError("unreachable: level 0 drops no replica")

    @staticmethod
    def _best(
        rows: list[Row], bounds: Bounds, terms: Terms, blocks: float, level: int
    ) -> tuple[Row | None, bool]:
        """The highest-scoring row the guard allows at `level` (None if it allows none; ties:
        the fewest in-flight plus queued, then the first in turn), and whether a row with a
        cached prefix was dropped. Guard, score and pick in one pass: the hot path."""
        mean, limit, p_limit, s_limit, lo, span, p_lo, p_span = bounds
        w_prefix, w_load, w_queue, w_kv, w_pressure, w_work = terms
        chosen, best_score, best_pending, skipped = None, 0.0, 0, False
        for row in rows:
            c, busy, load, ratio, pressure = row
            if level and (  # step 2: a hotspot
                busy > limit
                or (level == 2 and (pressure > p_limit or (load.share > s_limit and busy > mean)))
            ):
                skipped = skipped or ratio > 0
                continue
            score = w_prefix * ratio  # step 3, each term skipped when it is zero
            if span:
                score -= w_load * ((busy - lo) / span)
            if c.queued:
                score -= w_queue * c.queued / max(1, c.max_concurrency)
            if c.kv_usage:
                score -= w_kv * c.kv_usage
            if p_span:
                score -= w_pressure * ((pressure - p_lo) / p_span)
            work = load.work
            if work:
                score -= w_work * work / blocks
            if (
                chosen is None
                or score > best_score
                or (score == best_score and busy < best_pending)
            ):
                chosen, best_score, best_pending = row, score, busy
        return chosen, skipped

    def _account(
        self, request: RequestView, loads: ModelLoads, load: ReplicaLoad, new_blocks: int
    ) -> None:
        """Step 5's loads: the request's new blocks go on the replica's outstanding work (until
        its first token or completion) and pressure, the request on its share; one step of
        decay for every replica of the model (the gain grows)."""
        gain = loads.gain / self._decay
        load.work += new_blocks
        self._open[id(request)] = (load, new_blocks)
        if len(self._open) > 100_000:  # completions not reported: forget the oldest
            del self._open[next(iter(self._open))]
        load.pressure += (new_blocks + 1) * gain
        load.share += gain
        if gain > 1e100:
            for each in loads.replicas.values():
                each.pressure /= gain
                each.share /= gain
            gain = 1.0
        loads.gain = gain

    def _reason(self, ratio: float, skipped: bool) -> str:
        """The decision's reason: the chosen replica's match, else whether the guard acted."""
        if ratio > 0:
            return match_reason(ratio, self.reasons)
        return "hotspot-guard" if skipped else "least-load"
