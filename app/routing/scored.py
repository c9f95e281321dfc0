"""The default policy: weighted prefix, load, queue and KV-utilisation scores, hotspot-guarded."""

from __future__ import annotations

from collections.abc import Sequence

from app.routing.policies import MATCH_REASONS, PrefixPolicy, eligible
from app.routing.tokens import DEFAULT_BLOCK_SIZE
from app.routing.types import Decision, ReplicaStats, RequestView


class ScoredPolicy(PrefixPolicy):
    """Best weighted score among replicas that are neither load nor cache hotspots.

    1. Keep the eligible replicas (healthy; LoRA holders first).
    2. Hotspot guard, with means over the eligible replicas (never drops them all): drop
       a. replicas whose in-flight plus queued count exceeds both `mean * hotspot_rel` and
          `mean + hotspot_abs`;
       b. replicas whose cache pressure (a moving average of the new, uncached blocks this
          policy sent them) exceeds both `mean * pressure_rel` and `mean + pressure_abs`
          (default: a quarter of `max_blocks`);
       c. replicas busier than the mean whose share of recent requests (a moving average)
          exceeds both `mean * share_rel` and `mean + share_abs`.
    3. Score each remaining replica:
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
    """

    name = "scored"

    def __init__(
        self,
        block_size: int = DEFAULT_BLOCK_SIZE,
        max_blocks: int = 100_000,
        w_prefix: float = 3.0,
        w_load: float = 0.5,
        w_queue: float = 2.0,
        w_kv: float = 1.0,
        w_pressure: float = 0.25,
        w_work: float = 1.0,
        cold_match: float = 0.5,
        cold_prefix_scale: float = 0.25,
        cold_pressure_scale: float = 10.0,
        hotspot_rel: float = 1.5,
        hotspot_abs: float = 6.0,
        pressure_rel: float = 1.25,
        pressure_abs: float | None = None,
        share_rel: float = 2.0,
        share_abs: float = 8.0,
        pressure_window: int = 1024,
    ) -> None:
        super().__init__(block_size, max_blocks, min_match=0.0)
        self.w_prefix, self.w_load, self.w_queue, self.w_kv = w_prefix, w_load, w_queue, w_kv
        self.w_pressure, self.w_work = w_pressure, w_work
        self.cold_match, self.cold_prefix_scale = cold_match, cold_prefix_scale
        self.cold_pressure_scale = cold_pressure_scale
        self.hotspot_rel, self.hotspot_abs = hotspot_rel, hotspot_abs
        self.pressure_rel, self.share_rel, self.share_abs = pressure_rel, share_rel, share_abs
        self.pressure_abs = max_blocks / 4 if pressure_abs is None else pressure_abs
        self._decay = 1.0 - 1.0 / max(1, pressure_window)
        # Per model and replica: [pressure, share, work]. Pressure and share are kept inflated
        # by `_gain` so that decaying every replica is one multiplication of the gain
        # (renormalised when it grows large); work is the uncached blocks sent there by requests
        # whose first token or completion has not been reported yet.
        self._state: dict[str, dict[str, list[float]]] = {}
        self._gain: dict[str, float] = {}
        self._open: dict[int, tuple[list[float], float]] = {}  # id(request) -> work added
        self._turn = 0

    def on_first_token(self, request: RequestView, replica_id: str) -> None:
        """The request's prefill is done: take its uncached blocks off the outstanding work."""
        self.on_complete(request, replica_id)

    def on_complete(self, request: RequestView, replica_id: str) -> None:
        """Take the request's uncached blocks off the replica's outstanding work (if still on)."""
        opened = self._open.pop(id(request), None)
        if opened is not None:
            entry, blocks = opened
            entry[2] = max(0.0, entry[2] - blocks)

    def outstanding_work(self, model: str, replica_id: str) -> float:
        """Uncached blocks sent to the replica whose prefill has not been reported done."""
        entry = self._state.get(model, {}).get(replica_id)
        return entry[2] if entry is not None else 0.0

    def forget_replica(self, replica_id: str) -> None:
        super().forget_replica(replica_id)
        for table in self._state.values():
            table.pop(replica_id, None)

    def choose(self, request: RequestView, candidates: Sequence[ReplicaStats]) -> Decision:
        pool = eligible(request, candidates)
        n = len(pool)
        model = request.model
        ratios = self._matches(request, pool)
        table = self._state.get(model)
        if table is None:
            table = self._state[model] = {}
            self._gain[model] = 1.0
        gain = self._gain[model]
        # Per-replica inputs, sums and ranges in one pass (this is the hot path: one loop
        # instead of a comprehension and a builtin call per figure).
        rows = []
        total = p_total = s_total = 0.0
        lo = hi = 0
        p_lo = p_hi = 0.0
        first = True
        for c, ratio in zip(pool, ratios, strict=False):  # equal lengths
            entry = table.get(c.replica_id)
            if entry is None:
                entry = table[c.replica_id] = [0.0, 0.0, 0.0]
            busy = c.in_flight + c.queued
            if not busy:  # self-healing when completions go unreported
                entry[2] = 0.0
            pr = entry[0]
            rows.append((c, busy, entry, ratio, pr))
            total += busy
            p_total += pr
            s_total += entry[1]
            if first:
                lo = hi = busy
                p_lo = p_hi = pr
                first = False
                continue
            if busy < lo:
                lo = busy
            elif busy > hi:
                hi = busy
            if pr < p_lo:
                p_lo = pr
            elif pr > p_hi:
                p_hi = pr
        best_ratio = max(ratios)
        mean, p_mean, s_mean = total / n, p_total / n, s_total / n
        # The larger of the relative and the absolute bound (conditionals: cheaper than max()).
        limit, bound = mean * self.hotspot_rel, mean + self.hotspot_abs
        limit = limit if limit >= bound else bound
        p_limit, bound = p_mean * self.pressure_rel, p_mean + self.pressure_abs * gain
        p_limit = p_limit if p_limit >= bound else bound
        s_limit, bound = s_mean * self.share_rel, s_mean + self.share_abs * gain
        s_limit = s_limit if s_limit >= bound else bound
        span, p_span = hi - lo, p_hi - p_lo
        self._turn += 1
        k = self._turn % n
        if k:
            rows = rows[k:] + rows[:k]
        blocks = request.prompt_tokens / self.block_size
        if blocks < 1:
            blocks = 1
        w_prefix, w_pressure = self.w_prefix, self.w_pressure
        if best_ratio < self.cold_match:
            w_prefix *= self.cold_prefix_scale
            w_pressure *= self.cold_pressure_scale
        w_load, w_queue, w_kv, w_work = self.w_load, self.w_queue, self.w_kv, self.w_work
        # Highest score among the allowed (the guard of step 2, relaxed when it drops all);
        # ties: fewest in-flight plus queued, then the first in turn order. Load and pressure
        # are scaled from 0 (least) to 1 (most) over the eligible replicas.
        chosen = None
        for guard in (2, 1, 0):
            best_score, best_pending, skipped = 0.0, 0, False
            for c, busy, entry, ratio, pr in rows:
                if guard and (
                    busy > limit
                    or (guard == 2 and (pr > p_limit or (entry[1] > s_limit and busy > mean)))
                ):
                    skipped = skipped or ratio > 0
                    continue
                score = w_prefix * ratio
                if span:
                    score -= w_load * ((busy - lo) / span)
                if c.queued:
                    score -= w_queue * c.queued / max(1, c.max_concurrency)
                if c.kv_usage:
                    score -= w_kv * c.kv_usage
                if p_span:
                    score -= w_pressure * ((pr - p_lo) / p_span)
                work = entry[2]
                if work:
                    score -= w_work * work / blocks
                if (
                    chosen is None
                    or score > best_score
                    or (score == best_score and busy < best_pending)
                ):
                    best_score, best_pending, chosen = score, busy, (c, entry, ratio)
            if chosen is not None:
                break
        replica, entry, ratio = chosen  # type: ignore[misc]  # set: some replica passes guard 0
        if ratio > 0:
            reason = MATCH_REASONS[round(ratio * 100)]
        elif skipped:
            reason = "hotspot-guard"
        else:
            reason = "least-load"
        rid = replica.replica_id
        hashes = request.block_hashes(self.block_size)
        new_blocks = len(hashes) - round(ratio * request.prompt_tokens / self.block_size)
        if new_blocks < 0:
            new_blocks = 0
        gain /= self._decay
        entry[2] += new_blocks
        self._open[id(request)] = (entry, new_blocks)
        if len(self._open) > 100_000:  # completions not reported: forget the oldest
            del self._open[next(iter(self._open))]
        entry[0] += (new_blocks + 1) * gain
        entry[1] += gain
        if gain > 1e100:
            for e in table.values():
                e[0] /= gain
                e[1] /= gain
            gain = 1.0
        self._gain[model] = gain
        self.index(model).insert(rid, hashes)
        return Decision(rid, self.name, reason)
