"""Decisions counted by policy and reason kind (for metrics and the lab)."""

from __future__ import annotations

from collections import Counter

from app.routing.types import Decision


class DecisionCounts:
    """A counter of decisions keyed by (policy, reason kind), e.g. ('scored', 'prefix-match')."""

    def __init__(self) -> None:
        self.counts: Counter[tuple[str, str]] = Counter()

    def add(self, decision: Decision) -> None:
        self.counts[(decision.policy, decision.reason_kind)] += 1

    def by_reason(self) -> dict[str, int]:
        """Counts per reason kind, all policies together."""
        out: Counter[str] = Counter()
        for (_, reason), n in self.counts.items():
            out[reason] += n
        return dict(out)
