"""Per-key and per-tenant limits: request rate (token bucket), tokens per minute and per UTC day,
requests in flight. Held in this ingress replica's memory.

A request is admitted after its checks (a request refused for a bad parameter costs nothing),
charged its estimated prompt plus the most output it may produce, and settled to the tokens it
really used when the ingress learns them (`Lease.settle`): the difference goes back to (or is
taken from) the buckets it was charged to.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from app.config import KeyLimits, TenantQuotas
from app.errors import OpenAIError

DAY_S = 86_400
_USAGE_FIELDS = re.compile(rb'"(prompt_tokens|completion_tokens)"\s*:\s*(\d+)')
_USAGE_SPAN = 400  # bytes after `"usage"` that hold its counts (vLLM puts them first)


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
        """Take `amount` (a negative amount gives it back, up to the capacity)."""
        self.level = min(self.capacity, self.level - amount)


class DayCounter:
    """Tokens used in the current UTC day, against `limit`."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.day = -1
        self.used = 0

    def wait_for(self, amount: int, wall: float) -> float:
        """Seconds until `amount` more fits (0 if it does now): the next UTC midnight."""
        day = int(wall // DAY_S)
        if day != self.day:
            self.day, self.used = day, 0
        return 0.0 if self.used + amount <= self.limit else (day + 1) * DAY_S - wall

    def take(self, amount: int) -> None:
        self.used = max(0, self.used + amount)


@dataclass
class _State:
    limits: KeyLimits
    requests: TokenBucket | None
    tokens: TokenBucket | None
    day: DayCounter | None
    in_flight: int = 0


@dataclass
class Lease:
    """One admitted request, charged `tokens`; `settle()` with what it really used once known,
    `release()` when it has finished (each idempotent)."""

    _state: _State
    tokens: int
    tenant: str | None = None
    _released: bool = field(default=False)
    _settled: bool = field(default=False)

    def settle(self, used: int) -> None:
        """Charge `used` tokens instead of the estimate (refunding or taking the difference)."""
        if self._settled:
            return
        self._settled = True
        difference, self.tokens = used - self.tokens, used
        for bucket in (self._state.tokens, self._state.day):
            if bucket is not None:
                bucket.take(difference)

    def settle_usage(self, usage: object) -> None:
        """`settle` from an OpenAI `usage` object (a dict), when it has the prompt's count."""
        if isinstance(usage, dict) and isinstance(usage.get("prompt_tokens"), int):
            self.settle(usage["prompt_tokens"] + (usage.get("completion_tokens") or 0))

    @property
    def counts_tokens(self) -> bool:
        """Whether a token limit holds this request (so settling it matters)."""
        return self._state.tokens is not None or self._state.day is not None

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._state.in_flight -= 1


class QuotaError(OpenAIError):
    """A refusal by a limit; `quota` names it (a bounded metrics label)."""

    quota = ""


def _refusal(quota: str, status: int, message: str, **fields: Any) -> QuotaError:
    error = QuotaError(status, message, **fields)
    error.quota = quota
    return error


class KeyLimiter:
    """Admits or refuses requests per key id, or per tenant for tenants' keys; refusals are
    429 with `Retry-After` (or 400 for a request larger than a token limit)."""

    def __init__(
        self,
        limits: KeyLimits,
        clock: Callable[[], float] = time.monotonic,
        *,
        tenants: Mapping[str, TenantQuotas] | None = None,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.limits = limits
        self.tenants = dict(tenants or {})
        self._clock = clock
        self._wall = wall
        self._keys: dict[str, _State] = {}
        self._tenant_states: dict[str, _State] = {}

    def _state(self, key_id: str, tenant: str | None, now: float) -> _State:
        states, name = (self._keys, key_id) if tenant is None else (self._tenant_states, tenant)
        state = states.get(name)
        if state is None:
            limits = self.limits if tenant is None else self.tenants[tenant]
            rps, tpm = limits.requests_per_second, limits.tokens_per_minute
            burst = limits.burst or max(1, math.ceil(rps or 1))
            daily = getattr(limits, "tokens_per_day", None)
            state = states[name] = _State(
                limits=limits,
                requests=TokenBucket(rps, burst, now) if rps else None,
                tokens=TokenBucket(tpm / 60, tpm, now) if tpm else None,
                day=DayCounter(daily) if daily else None,
            )
        return state

    def acquire(self, key_id: str, tokens: int, tenant: str | None = None) -> Lease:
        """Admit one request costing `tokens` (estimated prompt + max output), or raise."""
        now = self._clock()
        state = self._state(key_id, tenant, now)
        limits = state.limits
        who = "this API key" if tenant is None else f"tenant {tenant!r}"
        if limits.max_concurrent is not None and state.in_flight >= limits.max_concurrent:
            raise _too_many(
                "max_concurrent", f"more than {limits.max_concurrent} concurrent requests", who, 1
            )
        waits = []
        if state.requests is not None:
            rate = f"{limits.requests_per_second:g} requests per second"
            waits.append((state.requests.wait_for(1, now), rate, "requests_per_second"))
        if state.tokens is not None:
            _fits(tokens, state.tokens.capacity, "per minute", "tokens_per_minute")
            rate = f"{limits.tokens_per_minute} tokens per minute"
            waits.append((state.tokens.wait_for(tokens, now), rate, "tokens_per_minute"))
        if state.day is not None:
            _fits(tokens, state.day.limit, "per day", "tokens_per_day")
            rate = f"{state.day.limit} tokens per day"
            waits.append((state.day.wait_for(tokens, self._wall()), rate, "tokens_per_day"))
        wait, what, quota = max(waits, default=(0.0, "", ""))
        if wait > 0:
            raise _too_many(quota, f"rate limit of {what} reached", who, wait)
        if state.requests is not None:
            state.requests.take(1)
        for bucket in (state.tokens, state.day):
            if bucket is not None:
                bucket.take(tokens)
        state.in_flight += 1
        return Lease(state, tokens, tenant)


def _fits(tokens: int, limit: float, per: str, quota: str) -> None:
    if tokens > limit:
        raise _refusal(
            quota,
            400,
            f"request needs about {tokens} tokens, more than the limit of {int(limit)} tokens "
            f"{per}",
            param="max_tokens",
            code="tokens_exceed_limit",
        )


def _too_many(quota: str, reason: str, who: str, retry_after_s: float) -> QuotaError:
    seconds = max(1, math.ceil(retry_after_s))
    return _refusal(
        quota,
        429,
        f"{reason} for {who}; retry after {seconds} s",
        code="rate_limit_exceeded",
        headers={"retry-after": str(seconds)},
    )


def usage_of(body: bytes) -> tuple[int, int] | None:
    """(prompt, completion) tokens of an OpenAI JSON answer's top-level `usage`, found without
    parsing the answer: its last `"usage"` key (a key inside a string would have its quotes
    escaped), then the two counts just after it; None when it has no usage."""
    at = body.rfind(b'"usage"')
    if at < 0:
        return None
    counts = dict(_USAGE_FIELDS.findall(body, at, at + _USAGE_SPAN))
    if b"prompt_tokens" not in counts:
        return None
    return int(counts[b"prompt_tokens"]), int(counts.get(b"completion_tokens", 0))
