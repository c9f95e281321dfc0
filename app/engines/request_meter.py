"""Per-token figures of an engine replica's answers, measured where the tokens are made.

`RequestMeter` keeps, per endpoint, the inter-token latency histogram of the replica's streams
(the time between consecutive chunks its engine yields) and its prompt and output token totals
(from each answer's `usage`, which the replica reads off the engine's response object, or off
the stream's final usage chunk: it asks the engine for one on every stream and drops it when
the client did not). The replica reports `snapshot()` in its routing stats; the ingress sums the
replicas into `/metrics`. A stream's usage also goes to the ingress, as an SSE comment in the same
bytes as the stream's final `data: [DONE]` (`app.engines.http_server.usage_comment`). Plain
Python.
"""

from __future__ import annotations

import bisect
import json
import time
from collections.abc import AsyncIterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from app.engines.http_server import Usage, usage_comment, usage_pair

# Seconds; the ingress exports the histogram with these bounds (`vrstack_inter_token_...`).
ITL_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1, 2.5, 5)
# Only a key can look like this in JSON (quotes inside strings are escaped): pydantic's form
# (vLLM's chunks) and json.dumps' form.
_USAGE_KEYS = ('"usage":{', '"usage": {')
_DONE = "data: [DONE]"


@dataclass(slots=True)
class _Figures:
    itl_counts: list[int] = field(default_factory=lambda: [0] * (len(ITL_BUCKETS) + 1))
    itl_sum: float = 0.0
    prompt_tokens: int = 0
    output_tokens: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "itl_counts": list(self.itl_counts),
            "itl_sum": self.itl_sum,
            "prompt_tokens": self.prompt_tokens,
            "output_tokens": self.output_tokens,
        }


def wants_usage(body: Mapping[str, Any]) -> bool:
    """Whether a request asks for its stream's usage chunk (`stream_options.include_usage`)."""
    options = body.get("stream_options")
    return isinstance(options, dict) and bool(options.get("include_usage"))


class RequestMeter:
    """Inter-token latency and token totals per endpoint of one replica."""

    def __init__(self) -> None:
        self._figures: dict[str, _Figures] = {}

    def _of(self, endpoint: str) -> _Figures:
        figures = self._figures.get(endpoint)
        if figures is None:
            figures = self._figures[endpoint] = _Figures()
        return figures

    def usage(self, endpoint: str, usage: Mapping[str, Any] | None) -> None:
        """Count an answer's `usage` (prompt and completion tokens)."""
        if usage:
            figures = self._of(endpoint)
            figures.prompt_tokens += int(usage.get("prompt_tokens") or 0)
            figures.output_tokens += int(usage.get("completion_tokens") or 0)

    async def sse(
        self, endpoint: str, batches: AsyncIterable[list[str]], *, keep_usage: bool
    ) -> AsyncIterable[bytes]:
        """The stream's SSE strings as bytes, timed; its usage chunk counted, and dropped
        unless `keep_usage` (the client asked for it); the usage's comment for the ingress
        sent with the final `data: [DONE]`."""
        figures = self._of(endpoint)
        counts, last = figures.itl_counts, None
        usage: Usage | None = None
        async for batch in batches:
            for event in batch:
                if event.startswith(_DONE):
                    done = event.encode()
                    yield done if usage is None else usage_comment(usage) + done
                    continue
                if _USAGE_KEYS[0] in event or _USAGE_KEYS[1] in event:
                    found = json.loads(event.removeprefix("data: ")).get("usage")
                    self.usage(endpoint, found)
                    usage = usage_pair(found)
                    if keep_usage:
                        yield event.encode()
                    continue
                now = time.perf_counter()
                if last is not None:
                    gap = now - last
                    counts[bisect.bisect_left(ITL_BUCKETS, gap)] += 1
                    figures.itl_sum += gap
                last = now
                yield event.encode()

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """endpoint -> {"itl_counts" (per bucket, +Inf last), "itl_sum", "prompt_tokens",
        "output_tokens"}: totals since the replica started."""
        return {endpoint: figures.as_dict() for endpoint, figures in self._figures.items()}
