"""Route receipts: why a policy chose a replica, and how many cached tokens it expected there.

A request view with `receipt=True` asks its policy for one (`Decision.receipt`); policies
build it only then, off the hot path of requests that do not ask. A receipt names every
candidate with its match (its share of the prompt in the cached prefix, as the policy knows
it), its score and the score's terms when the policy scores (`scored`, `kv`), and whether the
hotspot guard set it aside; the winner's margin over the runner-up; and the predicted cached
tokens: the winner's match in tokens, at most the prompt's full blocks before its last token
(an engine computes at least one prompt token). The answer's
`usage.prompt_tokens_details.cached_tokens` is the realised count to check it against.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from app.routing.types import ReplicaStats, RequestView

TERMS = ("prefix", "load", "queue", "kv", "pressure", "work")  # a score's terms, signed


@dataclass(frozen=True, slots=True)
class CandidateReceipt:
    """One candidate replica as the policy saw it."""

    replica_id: str
    in_flight: int
    queued: int
    match: float  # share of the prompt in its cached prefix (0 to 1)
    score: float | None = None  # None: the policy does not score
    terms: Mapping[str, float] | None = None  # the score's terms by name (`TERMS`), signed
    hotspot: bool = False  # the hotspot guard set it aside

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "replica": self.replica_id,
            "in_flight": self.in_flight,
            "queued": self.queued,
            "match": round(self.match, 4),
        }
        if self.score is not None:
            out["score"] = round(self.score, 4)
        if self.terms is not None:
            out["terms"] = {k: round(v, 4) for k, v in self.terms.items()}
        if self.hotspot:
            out["hotspot"] = True
        return out


@dataclass(frozen=True, slots=True)
class RouteReceipt:
    """A decision's receipt (see the module doc)."""

    policy: str
    replica_id: str
    reason: str
    prompt_tokens: int
    predicted_cached_tokens: int
    margin: float | None  # the winner's score over the runner-up's (None: no scores, or alone)
    candidates: Sequence[CandidateReceipt]

    def to_json(self) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "replica": self.replica_id,
            "reason": self.reason,
            "prompt_tokens": self.prompt_tokens,
            "predicted_cached_tokens": self.predicted_cached_tokens,
            "margin": None if self.margin is None else round(self.margin, 4),
            "candidates": [c.to_json() for c in self.candidates],
        }


def predicted_cached(match: float, prompt_tokens: int, block_size: int) -> int:
    """Cached tokens a match promises: `match` of the prompt, at most its full blocks before
    its last token (an engine computes at least one prompt token)."""
    if prompt_tokens <= 0 or match <= 0:
        return 0
    cap = (prompt_tokens - 1) // block_size * block_size
    return min(round(match * prompt_tokens), cap)


def build_receipt(
    policy: str,
    replica_id: str,
    reason: str,
    request: RequestView,
    pool: Sequence[ReplicaStats],
    matches: Sequence[float] | None = None,
    *,
    block_size: int,
    scores: Sequence[tuple[float, Mapping[str, float], bool]] | None = None,
) -> RouteReceipt:
    """A receipt for a decision among `pool` (in pool order: `matches`, and `scores` as
    (score, terms, hotspot) when the policy scores)."""
    n = len(pool)
    matches = matches if matches is not None else [0.0] * n
    candidates = []
    for i, c in enumerate(pool):
        score, terms, hot = scores[i] if scores is not None else (None, None, False)
        candidates.append(
            CandidateReceipt(c.replica_id, c.in_flight, c.queued, matches[i], score, terms, hot)
        )
    chosen = next(i for i, c in enumerate(pool) if c.replica_id == replica_id)
    margin = None
    if scores is not None and n > 1:
        others = [s[0] for i, s in enumerate(scores) if i != chosen]
        margin = scores[chosen][0] - max(others)
    predicted = predicted_cached(matches[chosen], request.prompt_tokens, block_size)
    return RouteReceipt(
        policy, replica_id, reason, request.prompt_tokens, predicted, margin, tuple(candidates)
    )
