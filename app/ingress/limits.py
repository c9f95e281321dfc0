"""Per-key limits: request rate (token bucket), tokens per minute, requests in flight."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from app.config import KeyLimits
from app.errors import OpenAIError


class TokenBucket:
    """`capacity` units, refilled at `rate` units per second."""

    def __init__(self, rate: float, capacity: float, now: float) -> None:
        self.rate = rate
        self.capacity = capacity
        self.level = capacity
        self._at = now

    def wait_for(self, amount: float, now: float) -> float:
        """Seconds until `amount` could be taken (0 if it can be now)."""
        self.level = min(self.capacity, self.level + (now - self._at) * self.rate)
        self._at = now
        return 0.0 if self.level >= amount else (amount - self.level) / self.rate

    def take(self, amount: float) -> None:
        self.level -= amount


@dataclass
class _KeyState:
    requests: TokenBucket | None
    tokens: TokenBucket | None
    in_flight: int = 0


@dataclass
class Lease:
    """One admitted request; `release()` when it has finished (idempotent)."""

    _state: _KeyState
    _released: bool = field(default=False)

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._state.in_flight -= 1


class KeyLimiter:
    """Admits or refuses requests per key id; refusals are 429 with `Retry-After`."""

    def __init__(self, limits: KeyLimits, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self._clock = clock
        self._keys: dict[str, _KeyState] = {}

    def _state(self, key_id: str, now: float) -> _KeyState:
        state = self._keys.get(key_id)
        if state is None:
            rps, tpm = self.limits.requests_per_second, self.limits.tokens_per_minute
            burst = self.limits.burst or max(1, math.ceil(rps or 1))
            state = _KeyState(
                requests=TokenBucket(rps, burst, now) if rps else None,
                tokens=TokenBucket(tpm / 60, tpm, now) if tpm else None,
            )
            self._keys[key_id] = state
        return state

    def acquire(self, key_id: str, tokens: int) -> Lease:
        """Admit one request costing `tokens` (estimated prompt + max output), or raise."""
        limits, now = self.limits, self._clock()
        state = self._state(key_id, now)
        if limits.max_concurrent is not None and state.in_flight >= limits.max_concurrent:
            raise _too_many(f"more than {limits.max_concurrent} concurrent requests", 1.0)
        if state.tokens is not None and tokens > state.tokens.capacity:
            raise OpenAIError(
                400,
                f"request needs about {tokens} tokens, more than the limit of "
                f"{limits.tokens_per_minute} tokens per minute",
                param="max_tokens",
                code="tokens_exceed_limit",
            )
        waits = []
        if state.requests is not None:
            rate = f"{limits.requests_per_second:g} requests per second"
            waits.append((state.requests.wait_for(1, now), rate))
        if state.tokens is not None:
            rate = f"{limits.tokens_per_minute} tokens per minute"
            waits.append((state.tokens.wait_for(tokens, now), rate))
        wait, what = max(waits, default=(0.0, ""))
        if wait > 0:
            raise _too_many(f"rate limit of {what} reached", wait)
        for bucket, amount in ((state.requests, 1), (state.tokens, tokens)):
            if bucket is not None:
                bucket.take(amount)
        state.in_flight += 1
        return Lease(state)


def _too_many(reason: str, retry_after_s: float) -> OpenAIError:
    seconds = max(1, math.ceil(retry_after_s))
    return OpenAIError(
        429,
        f"{reason} for this API key; retry after {seconds} s",
        code="rate_limit_exceeded",
        headers={"retry-after": str(seconds)},
    )
