"""The `scored` policy's settings: its score weights and its hotspot guard, grouped.

Serve configs give them as flat keywords (`router.settings`); `split_settings` sorts those into
the two groups by name and rejects any other (TypeError, as a constructor would).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

# The score's weights in term order: prefix, load, queue, KV usage, pressure, outstanding work.
Terms = tuple[float, float, float, float, float, float]


@dataclass(frozen=True, slots=True)
class ScoredWeights:
    """The weights of the score's terms (step 3), and how a cold prompt rescales two of them:
    when no replica holds `cold_match` of the prompt, `w_prefix` is multiplied by
    `cold_prefix_scale` and `w_pressure` by `cold_pressure_scale`."""

    w_prefix: float = 3.0
    w_load: float = 0.5
    w_queue: float = 2.0
    w_kv: float = 1.0
    w_pressure: float = 0.25
    w_work: float = 1.0
    cold_match: float = 0.5
    cold_prefix_scale: float = 0.25
    cold_pressure_scale: float = 10.0

    def terms(self, cold: bool) -> Terms:
        """The score's weights in term order, scaled for a cold prompt if `cold`."""
        w_prefix, w_pressure = self.w_prefix, self.w_pressure
        if cold:
            w_prefix *= self.cold_prefix_scale
            w_pressure *= self.cold_pressure_scale
        return (w_prefix, self.w_load, self.w_queue, self.w_kv, w_pressure, self.w_work)


@dataclass(frozen=True, slots=True)
class HotspotGuard:
    """The hotspot guard (step 2): a replica is a hotspot when a figure exceeds both the mean
    times `*_rel` and the mean plus `*_abs`. `pressure_abs` None is a quarter of the index's
    `max_blocks`; `pressure_window` is the moving averages' window (requests)."""

    hotspot_rel: float = 1.5
    hotspot_abs: float = 6.0
    pressure_rel: float = 1.25
    pressure_abs: float | None = None
    share_rel: float = 2.0
    share_abs: float = 8.0
    pressure_window: int = 1024


_WEIGHTS = frozenset(f.name for f in fields(ScoredWeights))
_GUARD = frozenset(f.name for f in fields(HotspotGuard))


def split_settings(settings: dict[str, Any]) -> tuple[ScoredWeights, HotspotGuard]:
    """Flat keyword settings as the two groups; TypeError naming any unknown setting."""
    unknown = sorted(settings.keys() - _WEIGHTS - _GUARD)
    if unknown:
        allowed = ", ".join(["block_size", "max_blocks", *sorted(_WEIGHTS), *sorted(_GUARD)])
        raise TypeError(f"unexpected setting(s) {', '.join(unknown)}; allowed: {allowed}")
    weights = ScoredWeights(**{k: v for k, v in settings.items() if k in _WEIGHTS})
    guard = HotspotGuard(**{k: v for k, v in settings.items() if k in _GUARD})
    return weights, guard
