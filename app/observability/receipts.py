"""Route receipts checked against the engines' answers: the logs and the prediction figures.

A routing decision's match (the chosen replica's share of the prompt in its cached prefix, as
the policy knew it) predicts the answer's `usage.prompt_tokens_details.cached_tokens`. Every
answered request whose engine reports its cached tokens is checked (`check_prediction`) and
counted in `/metrics` (`StackMetrics`); a decision with a receipt is logged with the realised
count (`log_receipt`, logger `vrstack.receipts`).
"""

from __future__ import annotations

import json
import logging
from typing import NamedTuple

from app.engines.http_server import Usage
from app.routing.receipts import RouteReceipt

logger = logging.getLogger("vrstack.receipts")


class PredictionCheck(NamedTuple):
    """One answer's prompt tokens, the cached tokens its routing predicted and those its
    engine reported."""

    prompt: int
    predicted: int
    realised: int

    @property
    def over(self) -> int:
        """Predicted but not cached: the index held blocks the engine did not (stale)."""
        return max(0, self.predicted - self.realised)

    @property
    def under(self) -> int:
        """Cached but not predicted: the engine held blocks the index did not know of."""
        return max(0, self.realised - self.predicted)

    @property
    def error_share(self) -> float:
        """|predicted - realised| over the prompt's tokens."""
        return abs(self.predicted - self.realised) / self.prompt if self.prompt else 0.0


def check_prediction(match: float | None, usage: Usage | None) -> PredictionCheck | None:
    """The check of one answer (None: no prefix signal, or the engine did not report cached
    tokens). The prediction is `match` of the prompt, at most all but its last token (an
    engine computes at least one prompt token)."""
    if match is None or usage is None or usage.cached is None or usage.prompt <= 0:
        return None
    predicted = min(round(match * usage.prompt), usage.prompt - 1)
    return PredictionCheck(usage.prompt, predicted, usage.cached)


def log_receipt(request_id: str, receipt: RouteReceipt, usage: Usage | None) -> None:
    """Log a decision's receipt, with the answer's realised prompt and cached tokens."""
    if not logger.isEnabledFor(logging.INFO):
        return
    out = {"request_id": request_id, **receipt.to_json()}
    if usage is not None and usage.cached is not None:
        out["realised_prompt_tokens"] = usage.prompt
        out["realised_cached_tokens"] = usage.cached
    logger.info("route receipt %s", json.dumps(out, separators=(",", ":")))
