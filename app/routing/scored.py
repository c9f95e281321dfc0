"""The default policy: weighted prefix, load, queue and KV-utilisation scores, hotspot-guarded."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from app.routing.policies import PrefixPolicy, eligible
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
        self._open: OrderedDict[int, tuple[list[float], float]] = OrderedDict()
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
        model, block_size = request.model, self.block_size
        ratios = self._matches(request, pool)
        table = self._state.get(model)
        if table is None:
            table = self._state[model] = {}
            self._gain[model] = 1.0
        gain = self._gain[model]
        # One pass for the per-replica inputs: in-flight plus queued, and state.
        pending, entries = [0] * n, [None] * n
        for i, c in enumerate(pool):
            rid = c.replica_id
            entry = table.get(rid)
            if entry is None:
                entry = table[rid] = [0.0, 0.0, 0.0]
            busy = pending[i] = c.in_flight + c.queued
            if not busy:
                entry[2] = 0.0  # self-healing when completions go unreported
            entries[i] = entry
        pressure = [e[0] for e in entries]
        share = [e[1] for e in entries]
        mean = sum(pending) / n
        p_mean = sum(pressure) / n
        s_mean = sum(share) / n
        limit = max(mean * self.hotspot_rel, mean + self.hotspot_abs)
        p_limit = max(p_mean * self.pressure_rel, p_mean + self.pressure_abs * gain)
        s_limit = max(s_mean * self.share_rel, s_mean + self.share_abs * gain)
        allowed = [
            p <= limit and pr <= p_limit and (sh <= s_limit or p <= mean)
            for p, pr, sh in zip(pending, pressure, share, strict=True)
        ]
        if not any(allowed):
            allowed = [p <= limit for p in pending]
            if not any(allowed):
                allowed = [True] * n
        lo, hi = min(pending), max(pending)
        p_lo, p_hi = min(pressure), max(pressure)
        self._turn += 1
        blocks = max(1, request.prompt_tokens / block_size)
        best_ratio = max(ratios)
        w_prefix, w_pressure = self.w_prefix, self.w_pressure
        if best_ratio < self.cold_match:
            w_prefix *= self.cold_prefix_scale
            w_pressure *= self.cold_pressure_scale
        w_load, w_queue, w_kv, w_work = self.w_load, self.w_queue, self.w_kv, self.w_work
        # Highest score; ties: fewest in-flight plus queued, then the first in turn order.
        # Load and pressure are scaled from 0 (least) to 1 (most) over the eligible replicas.
        best_score, best_pending, chosen = 0.0, 0, -1
        turn = self._turn
        for j in range(n):
            i = (j + turn) % n
            if not allowed[i]:
                continue
            c = pool[i]
            busy = pending[i]
            score = w_prefix * ratios[i]
            if hi > lo:
                score -= w_load * ((busy - lo) / (hi - lo))
            if c.queued:
                score -= w_queue * c.queued / max(1, c.max_concurrency)
            if c.kv_usage:
                score -= w_kv * c.kv_usage
            if p_hi > p_lo:
                score -= w_pressure * ((pressure[i] - p_lo) / (p_hi - p_lo))
            work = entries[i][2]
            if work:
                score -= w_work * work / blocks
            if chosen < 0 or score > best_score or (score == best_score and busy < best_pending):
                best_score, best_pending, chosen = score, busy, i
        ratio = ratios[chosen]
        if ratio > 0:
            reason = f"prefix-match={ratio:.2f}"
        elif best_ratio > 0 and any(
            r > 0 and not ok for r, ok in zip(ratios, allowed, strict=True)
        ):
            reason = "hotspot-guard"
        else:
            reason = "least-load"
        rid = pool[chosen].replica_id
        hashes = request.block_hashes(block_size)
        new_blocks = max(0, len(hashes) - round(ratio * request.prompt_tokens / block_size))
        gain /= self._decay
        entry = entries[chosen]
        entry[2] += new_blocks
        self._open[id(request)] = (entry, new_blocks)
        if len(self._open) > 100_000:  # completions not reported: forget the oldest
            self._open.popitem(last=False)
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
