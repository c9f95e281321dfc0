"""Per-key and per-tenant limits: request rate (token bucket), tokens per minute and per UTC day,
requests in flight.

A request is admitted after its checks (a request refused for a bad parameter costs nothing),
charged its estimated prompt plus the most output it may produce, and settled to the tokens it
really used when the ingress learns them (`Lease.settle`): the difference goes back to (or is
taken from) the buckets it was charged to.

Where the budget lives:
- By default, in this process's memory (`_State`): every key and tenant when no ledger is
  shared (tests, a single process), and anonymous callers (auth off) always.
- With `KeyLimiter.share(ledger)` (the ingress deployment, on Ray), a tenant's quotas, and each
  key's `limits.per_key`, are the cluster's, in one ledger (`app.tenants.ledger`): a key's
  account is named by its key id (`KEY_PREFIX` + the digest prefix, never the key), made on
  its first request, and dropped by this replica (its slices given back) once unused for
  `KEY_IDLE_DROP_S`, or sooner beyond `MAX_KEY_ACCOUNTS`. Admission stays local and
  synchronous: this replica spends slices of the account's budget it took from the ledger
  earlier (`_Shared`), and a background exchange (`KeyLimiter.sync`, every `SYNC_S`, and at
  once when a slice runs low or short) gives back what it holds in excess and takes new slices
  sized to its recent demand.
  Nothing is admitted that the ledger has not granted, so the cluster admits no more than one
  bucket of the quota's size would; a request finding its slice short while the ledger still
  has budget is refused with `Retry-After: 1` unless the caller awaited `ready` first.

Usage: each admitted request is counted, when released, in its tenant's row of `usage` (keys
without a tenant: one row, `KEYS_ROW`) with the prompt and output tokens it settled
(`Lease.settle_tokens`); each refusal under its quota's name. The rows go to the ledger with
the exchange (cumulative, so a lost exchange loses nothing): `GET /usage`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from app.config import KeyLimits, TenantQuotas
from app.errors import OpenAIError
from app.ingress.auth import ANONYMOUS
from app.tenants.ledger import DAY_S, KEY_PREFIX, KEYS_ROW, DayCounter, TokenBucket, quota_sizes

__all__ = ["DAY_S", "DayCounter", "KeyLimiter", "Lease", "QuotaError", "TokenBucket"]

logger = logging.getLogger("vrstack.limits")

# Slices of a tenant's budget (docs/tenants.md#shared-quotas).
SYNC_S = 0.2  # the background exchange's period
HEARTBEAT_S = 2.0  # at least this often, even idle (the ledger forgets a replica after 10 s)
HORIZON_S = 1.0  # a slice covers this long of the replica's recent demand...
MIN_SHARE = 0.02  # ...and at least this share of the quota's size (and the largest request)...
MAX_SHARE = 0.25  # ...but at most this share (or the largest request, when larger)
KICK_GAP_S = 0.05  # the least time between two exchanges started by requests
SLICE_TTL_S = 5.0  # no exchange for this long: the slices are void (the ledger's TTL is 10 s)
IDLE_RETURN_S = 2.0  # a tenant idle this long on a replica: its slices go back to the ledger,
IDLE_KEEP_SHARE = 0.25  # but one request's, if the replicas' together are below this share
READY_TIMEOUT_S = 1.0  # the longest `ready` waits for the ledger
KEY_IDLE_DROP_S = 30.0  # a key unused this long: its account is given back and dropped here
MAX_KEY_ACCOUNTS = 4096  # beyond this many, the least recently used idle keys' accounts too
_QUOTA_OF = {
    "requests": "requests_per_second",
    "tokens": "tokens_per_minute",
    "day": "tokens_per_day",
    "slots": "max_concurrent",
}


class Ledger(Protocol):
    """What `KeyLimiter.share` needs of a ledger client (`app.tenants.ledger`)."""

    async def exchange(
        self, replica: str, items: list[dict[str, Any]], usage: dict[str, Any] | None = None
    ) -> list[dict[str, Any]]: ...


@dataclass
class _State:
    """A key's or tenant's limits in this process's memory."""

    limits: KeyLimits
    requests: TokenBucket | None
    tokens: TokenBucket | None
    day: DayCounter | None
    in_flight: int = 0

    @property
    def counts_tokens(self) -> bool:
        return self.tokens is not None or self.day is not None

    def charge(self, difference: int) -> None:
        for bucket in (self.tokens, self.day):
            if bucket is not None:
                bucket.take(difference)

    def release(self) -> None:
        self.in_flight -= 1


@dataclass
class _Usage:
    """This replica's cumulative figures for one usage row (a tenant, or the keys')."""

    wall: Callable[[], float]
    requests: int = 0  # admitted and answered (not given back as failed)
    prompt_tokens: int = 0
    output_tokens: int = 0
    tokens: int = 0  # charged: the answers' usage, else the estimates
    refused: dict[str, int] = field(default_factory=dict)  # quota -> refusals
    day: int = -1
    tokens_today: int = 0  # charged in UTC day `day`

    def answered(self, tokens: int) -> None:
        self.requests += 1
        self.tokens += tokens
        day = int(self.wall() // DAY_S)
        if day != self.day:
            self.day, self.tokens_today = day, 0
        self.tokens_today += tokens

    def report(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "prompt_tokens": self.prompt_tokens,
            "output_tokens": self.output_tokens,
            "tokens": self.tokens,
            "refused": dict(self.refused),
            "day": self.day,
            "tokens_today": self.tokens_today,
        }


@dataclass
class _Plan:
    """One account's part of an exchange in progress."""

    item: dict[str, Any]
    give: dict[str, float]
    refunds: dict[str, float]


class _Shared:
    """A tenant's (or a key's) slices of the cluster's budget held by this replica: `held` per
    kind (slots count those in use); refunds are spendable only once the ledger has been told
    of them."""

    def __init__(self, name: str, limits: KeyLimits, now: float) -> None:
        self.name = name
        self.limits = limits
        self.quotas = limits.model_dump(exclude_none=True)
        self.sizes = quota_sizes(self.quotas)
        self.held = dict.fromkeys(self.sizes, 0.0)
        self.refunds = {k: 0.0 for k in ("tokens", "day") if k in self.sizes}
        self.spent = dict.fromkeys(self.sizes, 0.0)
        self.rate = dict.fromkeys(self.sizes, 0.0)  # recent demand, units per second
        self.low = dict.fromkeys(self.sizes, 0.0)  # below this, top up at once
        self.need: dict[str, float] = {}  # what a request found short
        self.waits: dict[str, float] = {}  # kind -> until when the ledger said it has none
        self.free: dict[str, float] = {}  # what the ledger had left at the last exchange
        self.biggest = 1.0  # the largest request lately, in tokens
        self.pending = 0  # tokens of a request found short, until one is admitted
        self.in_flight = 0
        self.replicas = 1  # the replicas the ledger hears from
        self.day = -1  # the UTC day of the daily slice
        self.used_at = now
        self.planned_at = now

    @property
    def counts_tokens(self) -> bool:
        return "tokens" in self.sizes or "day" in self.sizes

    def charge(self, difference: int) -> None:
        for kind in self.refunds:
            if difference > 0:
                self.held[kind] -= difference  # below 0: a debt, paid at the next exchange
            else:
                self.refunds[kind] -= difference

    def release(self) -> None:
        self.in_flight -= 1

    def needs(self, tokens: int) -> dict[str, float]:
        amounts = {"requests": 1.0, "tokens": float(tokens), "day": float(tokens)}
        return {k: amounts.get(k, self.in_flight + 1.0) for k in self.sizes}

    def short(self, tokens: int, wall: float) -> list[str]:
        """The kinds this replica holds too little of for a request of `tokens`."""
        if "day" in self.sizes and int(wall // DAY_S) != self.day:
            self.held["day"] = self.refunds["day"] = 0.0  # yesterday's slice is worthless
        return [k for k, amount in self.needs(tokens).items() if self.held[k] < amount]

    def void(self) -> None:
        """Drop the slices (this replica has not reached the ledger for `SLICE_TTL_S`: the
        ledger may soon count them spent and refill in their place)."""
        for kind in self.held:
            self.held[kind] = float(self.in_flight) if kind == "slots" else min(self.held[kind], 0)

    def wait_s(self, kind: str, tokens: int, now: float, wall: float) -> float:
        """A refusal's `Retry-After` for `kind`: the ledger's wait if it said it has none, or
        the time the quota takes to refill the part that neither this replica nor (at the last
        exchange) the ledger holds; at least a second (the time to fetch a slice)."""
        if kind in self.waits:
            return max(1.0, self.waits[kind] - now)
        missing = self.needs(tokens)[kind] - self.held[kind] - self.free.get(kind, math.inf)
        if missing <= 0 or kind == "slots":
            return 1.0
        if kind == "day":
            return (int(wall // DAY_S) + 1) * DAY_S - wall
        rate = self.limits.requests_per_second if kind == "requests" else self.sizes[kind] / 60
        return max(1.0, missing / (rate or 1.0))

    def take(self, tokens: int, now: float) -> bool:
        """Spend a request's slices; whether a slice is now below its low mark."""
        for kind, amount in self.needs(tokens).items():
            if kind == "slots":
                self.spent[kind] += 1
            else:
                self.held[kind] -= amount
                self.spent[kind] += amount
        self.in_flight += 1
        self.used_at = now
        self.biggest = max(self.biggest, tokens)
        self.pending = 0
        return any(self.held[k] < self.low[k] for k in self.held)

    def plan(self, now: float, wall: float, *, close: bool = False) -> _Plan | None:
        """This account's item for an exchange, or None if it needs none now."""
        elapsed, self.planned_at = max(now - self.planned_at, SYNC_S), now
        idle = close or now - self.used_at > IDLE_RETURN_S
        if close:  # refunds, too, go back with everything held
            self.pending = 0
            for kind, amount in self.refunds.items():
                self.held[kind] += amount
                self.refunds[kind] = 0.0
        give: dict[str, float] = {}
        want: dict[str, float] = {}
        for kind, size in self.sizes.items():
            self.rate[kind] = 0.5 * self.rate[kind] + 0.5 * self.spent[kind] / elapsed
            self.spent[kind] = 0.0
            held = self.held[kind]
            if kind == "slots":
                spare = max(1, math.ceil(MIN_SHARE * size))
                if idle:
                    spare = int(not close and self.replicas <= IDLE_KEEP_SHARE * size)
                target = self.in_flight + max(spare, 1 if self.pending else 0)
                self.low[kind] = float(self.in_flight + 1)
            else:
                target = 0.0 if close else self._target(kind, size, idle)
                self.low[kind] = target / 2
            spare = held > target if kind == "slots" or idle else held > 2 * target
            if held < 0 or spare:
                give[kind] = held - target if held > 0 else held
            elif held < self.low[kind] or kind in self.need:
                want[kind] = target - held
            if kind in self.need:
                want[kind] = max(want.get(kind, 0.0), self.need[kind] - held)
        if not idle:  # the largest request lately, of the time it was busy
            self.biggest = max(1.0, self.biggest * 0.998)
        refunds = {k: v for k, v in self.refunds.items() if v}
        if not (give or want or refunds):
            return None
        for kind, amount in give.items():
            self.held[kind] -= amount
        for kind in refunds:
            self.refunds[kind] = 0.0
        held = {k: v + refunds.get(k, 0.0) for k, v in self.held.items()}
        need = {k: max(0.0, v - self.held[k]) for k, v in self.need.items()}
        self.need = {}
        item = {
            "account": self.name,
            "quotas": self.quotas,
            "day": self.day,
            "give": give,
            "held": held,
            "want": {k: v for k, v in want.items() if v > 0},
            "need": need,
        }
        return _Plan(item, give, refunds)

    def _target(self, kind: str, size: float, idle: bool) -> float:
        """The slice this replica means to hold of a bucket or the daily count."""
        unit = 1.0 if kind == "requests" else max(self.biggest, self.pending)
        if idle and self.pending:
            return unit  # a request is waiting for it
        if kind == "day":  # sized like the tokens per minute, or a minute of the day
            size = self.sizes.get("tokens", size / 1440)
        if idle:  # keep one request's slice, if the replicas' together are small beside the quota
            return unit if unit * self.replicas <= IDLE_KEEP_SHARE * size else 0.0
        floor = MIN_SHARE * size
        target = max(self.rate[kind] * HORIZON_S, floor, unit)
        return min(target, max(MAX_SHARE * size, unit))

    def apply(self, plan: _Plan, reply: dict[str, Any], now: float) -> None:
        """The ledger's answer to `plan`."""
        for kind, amount in plan.refunds.items():
            self.held[kind] += amount
        for kind, amount in reply.get("granted", {}).items():
            self.held[kind] += amount
        if "day" in self.sizes and reply.get("day", self.day) != self.day:
            self.day = reply["day"]
            self.held["day"] = float(reply.get("granted", {}).get("day", 0.0))
        self.waits = {kind: now + wait for kind, wait in reply.get("wait", {}).items()}
        self.free = reply.get("free", {})
        self.replicas = reply.get("replicas", self.replicas)

    def failed(self, plan: _Plan) -> None:
        """The exchange failed: keep the debts and refunds for the next one (what was given
        back is lost to this replica: the ledger may have it)."""
        for kind, amount in plan.give.items():
            if amount < 0:
                self.held[kind] += amount
        for kind, amount in plan.refunds.items():
            self.refunds[kind] += amount


@dataclass
class Lease:
    """One admitted request, charged `tokens`; `settle()` with what it really used once known,
    `release()` when it has finished (each idempotent)."""

    _state: _State | _Shared
    tokens: int
    tenant: str | None = None
    _released: bool = field(default=False)
    _settled: bool = field(default=False)
    _usage: _Usage | None = field(default=None, repr=False)  # its usage row
    _failed: bool = field(default=False)  # settled to nothing: not an answer

    def settle(self, used: int) -> None:
        """Charge `used` tokens instead of the estimate (refunding or taking the difference);
        0 is a failure's or a refusal's (not counted as an answered request)."""
        if self._settled:
            return
        self._settled = True
        self._failed = used == 0
        difference, self.tokens = used - self.tokens, used
        self._state.charge(difference)

    def settle_tokens(self, prompt: int, output: int) -> None:
        """`settle` to an answer's usage, counting its `prompt` and `output` tokens in the
        usage figures."""
        if self._settled:
            return
        if self._usage is not None:
            self._usage.prompt_tokens += prompt
            self._usage.output_tokens += output
        self.settle(prompt + output)
        self._failed = False  # an answer, even of no tokens

    def settle_usage(self, usage: object) -> None:
        """`settle_tokens` from an OpenAI `usage` object (a dict), when it has the prompt's
        count."""
        if isinstance(usage, dict) and isinstance(usage.get("prompt_tokens"), int):
            self.settle_tokens(usage["prompt_tokens"], usage.get("completion_tokens") or 0)

    @property
    def counts_tokens(self) -> bool:
        """Whether a token limit holds this request (so settling it matters)."""
        return self._state.counts_tokens

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._state.release()
            if self._usage is not None and not self._failed:
                self._usage.answered(self.tokens)


class QuotaError(OpenAIError):
    """A refusal by a limit; `quota` names it (a bounded metrics label)."""

    quota = ""


def _refusal(quota: str, status: int, message: str, **fields: Any) -> QuotaError:
    error = QuotaError(status, message, **fields)
    error.quota = quota
    return error


class KeyLimiter:
    """Admits or refuses requests per key id, or per tenant for tenants' keys; refusals are
    429 with `Retry-After` (or 400 for a request larger than a token limit). Counts each row's
    usage (`usage`: tenant name, or `KEYS_ROW`)."""

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
        self.ledger: Ledger | None = None
        self.replica = ""
        self._shared: dict[str, _Shared] = {}
        self._lock = asyncio.Lock()
        self._kicked: asyncio.Task | None = None
        self._kicked_at = -math.inf
        self._closed = False
        self._beat = -math.inf
        self.key_sizes = quota_sizes(limits.model_dump(exclude_none=True))
        self._key_shared: dict[str, _Shared] = {}  # key id -> its account (with a ledger)
        self.usage: dict[str, _Usage] = {}  # row (tenant, or KEYS_ROW) -> its figures
        self._reported: dict[str, Any] | None = None  # the usage the ledger last got
        self.since = wall()

    @property
    def wants_ledger(self) -> bool:
        """Whether any limit here becomes the cluster's with `share`: a tenant's quotas, or
        `limits.per_key`."""
        return bool(self.key_sizes) or any(
            quota_sizes(q.model_dump(exclude_none=True)) for q in self.tenants.values()
        )

    @property
    def key_accounts(self) -> int:
        """How many keys' accounts this replica holds."""
        return len(self._key_shared)

    # -- the cluster's ledger ---------------------------------------------------------------
    def share(self, ledger: Ledger, replica: str | None = None) -> None:
        """Hold tenants' quotas and keys' `limits.per_key` in `ledger` (shared by every replica
        calling it) from now on (anonymous callers stay in this process's memory). Call `sync`
        (or `run`) after."""
        self.ledger = ledger
        self.replica = replica or uuid.uuid4().hex
        now = self._clock()
        self._shared = {
            name: _Shared(name, quotas, now)
            for name, quotas in self.tenants.items()
            if quota_sizes(quotas.model_dump(exclude_none=True))
        }

    async def sync(self, *, close: bool = False) -> None:
        """One exchange with the ledger for the tenants that need one (all of them with
        `close`: everything held goes back); a heartbeat at least every `HEARTBEAT_S`."""
        if self.ledger is None or self._closed:
            return
        async with self._lock:
            if self._closed:
                return
            self._closed = close
            now, wall = self._clock(), self._wall()
            plans = [(state, state.plan(now, wall, close=close)) for state in self._shared.values()]
            closing = set(self._key_shared) if close else self._closing_keys(now)
            marks = {key_id: self._key_shared[key_id].used_at for key_id in closing}
            for key_id, state in self._key_shared.items():
                plans.append((state, state.plan(now, wall, close=key_id in closing)))
            plans = [(state, plan) for state, plan in plans if plan is not None]
            report = {row: usage.report() for row, usage in self.usage.items()}
            usage = None if report == self._reported else report
            if not plans and usage is None and now - self._beat < HEARTBEAT_S:
                self._drop_keys(marks)
                return
            items = [p.item for _, p in plans]
            try:
                if usage is None:
                    replies = await self.ledger.exchange(self.replica, items)
                else:
                    replies = await self.ledger.exchange(self.replica, items, usage)
            except Exception as exc:  # the ledger is away: spend what is held, keep the debts
                logger.warning("quota ledger exchange failed: %r", exc)
                for state, plan in plans:
                    state.failed(plan)
                return
            self._beat = now  # the slices held are good until now + SLICE_TTL_S
            self._reported = report
            now = self._clock()
            for (state, plan), reply in zip(plans, replies, strict=True):
                state.apply(plan, reply, now)
            self._drop_keys(marks)

    def _closing_keys(self, now: float) -> set[str]:
        """The keys whose accounts this exchange gives back whole and drops: unused for
        `KEY_IDLE_DROP_S`, and beyond `MAX_KEY_ACCOUNTS` the least recently used others
        (none with a request in flight)."""
        idle = [(s.used_at, k) for k, s in self._key_shared.items() if s.in_flight == 0]
        closing = {k for used_at, k in idle if now - used_at > KEY_IDLE_DROP_S}
        excess = len(self._key_shared) - len(closing) - MAX_KEY_ACCOUNTS
        if excess > 0:
            closing.update(k for _, k in sorted(x for x in idle if x[1] not in closing)[:excess])
        return closing

    def _drop_keys(self, marks: dict[str, float]) -> None:
        """Drop the accounts given back whole, unless a request came for them meanwhile."""
        for key_id, used_at in marks.items():
            state = self._key_shared.get(key_id)
            if state is not None and state.in_flight == 0 and state.used_at == used_at:
                del self._key_shared[key_id]

    def _account(self, key_id: str, tenant: str | None) -> _Shared | None:
        """The slices of the ledger's account for a request: its tenant's, or its key's (made
        on first use) when `limits.per_key` is shared; None: limits in this process."""
        if tenant is not None:
            return self._shared.get(tenant)
        if self.ledger is None or not self.key_sizes or key_id == ANONYMOUS:
            return None
        state = self._key_shared.get(key_id)
        if state is None:
            state = self._key_shared[key_id] = _Shared(
                KEY_PREFIX + key_id, self.limits, self._clock()
            )
        return state

    async def usage_figures(self) -> dict[str, Any]:
        """The usage rows: the cluster's from the ledger (`Ledger.usage`, `scope: cluster`)
        when one is shared, this replica's own (`scope: replica`) otherwise."""
        if self.ledger is not None and hasattr(self.ledger, "usage"):
            with contextlib.suppress(TimeoutError):  # this replica's latest figures first
                await asyncio.wait_for(self.sync(), READY_TIMEOUT_S)
            return {**await self.ledger.usage(), "scope": "cluster"}
        rows = {row: usage.report() for row, usage in self.usage.items()}
        day = int(self._wall() // DAY_S)
        for row in rows.values():
            if row["day"] != day:
                row["day"], row["tokens_today"] = day, 0
            row.pop("day")
        return {
            "rows": rows,
            "accounts": {},
            "since": self.since,
            "replicas": 1,
            "scope": "replica",
        }

    async def run(self, period_s: float = SYNC_S) -> None:
        """Exchange with the ledger every `period_s`, for ever (a background task)."""
        while True:
            await self.sync()
            await asyncio.sleep(period_s)

    async def ready(self, key_id: str, tokens: int, tenant: str | None = None) -> None:
        """Make sure this replica holds enough of the tenant's budget for a request of `tokens`
        (one awaited exchange, at most `READY_TIMEOUT_S`, only when it does not): awaited before
        `acquire`, a short slice waits for the ledger instead of being refused. The same for a
        key's own account (`limits.per_key` shared) with `tenant` None."""
        state = self._account(key_id, tenant)
        if state is None or not (short := state.short(tokens, self._wall())):
            return
        needs = state.needs(tokens)
        state.need.update({kind: needs[kind] for kind in short})
        state.used_at = self._clock()  # wanted: not idle
        state.pending = max(state.pending, tokens)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.sync(), READY_TIMEOUT_S)

    async def close(self) -> None:
        """Give back everything held (the replica is stopping); no exchange after it."""
        if self._kicked is not None:
            self._kicked.cancel()
        await self.sync(close=True)

    def _kick(self) -> None:
        """An exchange soon, in the background (when an event loop runs)."""
        now = self._clock()
        if (self._kicked is not None and not self._kicked.done()) or (
            now - self._kicked_at < KICK_GAP_S  # at quota, not an exchange per request
        ):
            return
        with contextlib.suppress(RuntimeError):  # no running loop: `sync` is called by hand
            self._kicked = asyncio.get_running_loop().create_task(self.sync())
            self._kicked_at = now

    def _acquire_shared(self, state: _Shared, tokens: int, tenant: str | None) -> Lease:
        limits = state.limits
        who = "this API key" if tenant is None else f"tenant {tenant!r}"
        if "tokens" in state.sizes:
            _fits(tokens, state.sizes["tokens"], "per minute", "tokens_per_minute")
        if "day" in state.sizes:
            _fits(tokens, state.sizes["day"], "per day", "tokens_per_day")
        now = self._clock()
        if now - self._beat > SLICE_TTL_S:
            state.void()
        short = state.short(tokens, self._wall())
        if short:
            needs = state.needs(tokens)
            state.need.update({kind: needs[kind] for kind in short})
            state.used_at = now  # wanted: not idle
            state.pending = max(state.pending, tokens)
            self._kick()
            wall = self._wall()
            wait, kind = max((state.wait_s(k, tokens, now, wall), k) for k in short)
            if kind == "slots":
                reason = f"more than {limits.max_concurrent} concurrent requests"
            elif kind == "requests":
                reason = f"rate limit of {limits.requests_per_second:g} requests per second reached"
            else:
                per = "minute" if kind == "tokens" else "day"
                reason = f"rate limit of {int(state.sizes[kind])} tokens per {per} reached"
            raise _too_many(_QUOTA_OF[kind], reason, who, wait)
        if state.take(tokens, now):
            self._kick()
        return Lease(state, tokens, tenant)

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
        """Admit one request costing `tokens` (estimated prompt + max output), or raise; counted
        in its usage row either way."""
        row = KEYS_ROW if tenant is None else tenant
        usage = self.usage.get(row)
        if usage is None:
            usage = self.usage[row] = _Usage(self._wall)
        try:
            lease = self._admit(key_id, tokens, tenant)
        except QuotaError as exc:
            usage.refused[exc.quota] = usage.refused.get(exc.quota, 0) + 1
            raise
        lease._usage = usage
        return lease

    def _admit(self, key_id: str, tokens: int, tenant: str | None) -> Lease:
        if (shared := self._account(key_id, tenant)) is not None:
            return self._acquire_shared(shared, tokens, tenant)
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
