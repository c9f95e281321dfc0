"""The cluster's quota ledger: the authoritative token buckets, daily counts and concurrency slots
of every tenant, shared by all ingress replicas (docs/tenants.md#shared-quotas).

Ingress replicas do not ask the ledger about each request. Each holds *slices* of a tenant's
budget (requests, tokens, daily tokens, concurrent slots) taken from the ledger and spends them
locally (`app.ingress.limits`); in the background it exchanges them: gives back what it holds in
excess or owes (answers that used more than reserved), reports what it still holds, and takes
new slices. The ledger keeps, per tenant and kind:

- `requests` and `tokens`: a token bucket (`level`) plus what each replica holds (`outstanding`).
  A slice moves budget from the level to a replica; spending it is local. The bucket refills
  only while `level + outstanding` is below its capacity, so the cluster as a whole never admits
  more than one bucket of the quota's size would: what replicas hold is part of the bucket.
  A replica reports what it holds at each exchange; one it has not heard from for `holder_ttl_s`
  is taken to have spent all it held (its slices are lost, never counted twice).
- `day`: tokens used in the current UTC day, slices included; what is given back is subtracted.
- `slots`: `max_concurrent` less the slots the replicas hold (in use or spare); a lost replica's
  slots come back after `holder_ttl_s`.

Keys without a tenant that have `limits.per_key` are accounts too, created on first use and
named `key:<key id>` (the key's digest prefix, never the key; tenant names cannot hold `:`);
an account of a key that no replica holds anything of and whose buckets are full again is
forgotten (`sweep`), as a fresh one would be the same.

Usage: each replica also reports, with its exchange, its cumulative figures per tenant
(requests answered, refusals per quota, prompt and output tokens; keys without a tenant in one
row, `KEYS_ROW`); the ledger sums the replicas it hears from and those it has forgotten
(`usage`), for `GET /usage` and `vrstack usage`.

`Ledger` is plain Python (tests and a single process use it directly through `LocalLedger`);
`ActorLedger` is its client through a named, detached Ray actor (`LedgerActor`), one per Serve
application, which ends itself once no ingress replica has called it for `idle_exit_s`.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from typing import Any

from app.idle_actor import end_when_idle

DAY_S = 86_400
HOLDER_TTL_S = 10.0  # a replica silent this long has lost what it held
IDLE_EXIT_S = 60.0  # the actor ends when no replica has called it for this long
NAMESPACE = "vrstack"
KINDS = ("requests", "tokens", "day", "slots")
KEY_PREFIX = "key:"  # a key's account: KEY_PREFIX + its key id (a tenant name has no ':')
KEYS_ROW = ""  # the usage row of every caller without a tenant (anonymous and per-key)
SWEEP_S = 30.0  # how often the ledger forgets keys' accounts at rest
USAGE_COUNTS = ("requests", "prompt_tokens", "output_tokens", "tokens")


class TokenBucket:
    """`capacity` units, refilled at `rate` units per second."""

    def __init__(self, rate: float, capacity: float, now: float) -> None:
        self.rate = rate
        self.capacity = capacity
        self.level = capacity
        self._at = now

    def refill(self, now: float, ceiling: float | None = None) -> None:
        """Refill up to `now`, never above `ceiling` (the capacity by default); a level above the
        ceiling is lowered to it."""
        top = self.capacity if ceiling is None else ceiling
        self.level = min(top, self.level + max(0.0, now - self._at) * self.rate)
        self._at = now

    def wait_for(self, amount: float, now: float) -> float:
        """Seconds until `amount` could be taken (0 if it can be now)."""
        self.refill(now)
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

    def roll(self, wall: float) -> int:
        """Start a new count at UTC midnight; the current day's number."""
        day = int(wall // DAY_S)
        if day != self.day:
            self.day, self.used = day, 0
        return day

    def wait_for(self, amount: int, wall: float) -> float:
        """Seconds until `amount` more fits (0 if it does now): the next UTC midnight."""
        day = self.roll(wall)
        return 0.0 if self.used + amount <= self.limit else (day + 1) * DAY_S - wall

    def take(self, amount: float) -> None:
        self.used = max(0, self.used + amount)


def quota_sizes(quotas: dict[str, Any]) -> dict[str, float]:
    """The size of each kind a tenant's quotas limit: requests (the bucket's burst), tokens (a
    minute's), day (the daily limit), slots (max_concurrent)."""
    sizes: dict[str, float] = {}
    rps = quotas.get("requests_per_second")
    if rps:
        sizes["requests"] = quotas.get("burst") or max(1, math.ceil(rps))
    if quotas.get("tokens_per_minute"):
        sizes["tokens"] = quotas["tokens_per_minute"]
    if quotas.get("tokens_per_day"):
        sizes["day"] = quotas["tokens_per_day"]
    if quotas.get("max_concurrent"):
        sizes["slots"] = quotas["max_concurrent"]
    return sizes


class _Account:
    """One tenant's authoritative state."""

    def __init__(self, quotas: dict[str, Any], now: float) -> None:
        self.quotas: dict[str, Any] = {}
        self.buckets: dict[str, TokenBucket] = {}
        self.day: DayCounter | None = None
        self.slots = 0
        self.outstanding: dict[str, dict[str, float]] = {}  # replica -> kind -> held
        self.configure(quotas, now)

    def configure(self, quotas: dict[str, Any], now: float) -> None:
        """Take new quotas (a redeploy may change them), keeping the counts."""
        if quotas == self.quotas:
            return
        self.quotas = dict(quotas)
        sizes = quota_sizes(quotas)
        rates = {
            "requests": quotas.get("requests_per_second") or 0,
            "tokens": (quotas.get("tokens_per_minute") or 0) / 60,
        }
        for kind in ("requests", "tokens"):
            if kind not in sizes:
                self.buckets.pop(kind, None)
            elif kind in self.buckets:
                bucket = self.buckets[kind]
                bucket.refill(now)
                bucket.rate, bucket.capacity = rates[kind], sizes[kind]
                bucket.level = min(bucket.level, bucket.capacity)
            else:
                self.buckets[kind] = TokenBucket(rates[kind], sizes[kind], now)
        if "day" not in sizes:
            self.day = None
        elif self.day is None:
            self.day = DayCounter(int(sizes["day"]))
        else:
            self.day.limit = int(sizes["day"])
        self.slots = int(sizes.get("slots", 0))

    def held(self, kind: str) -> float:
        return sum(kinds.get(kind, 0.0) for kinds in self.outstanding.values())

    def refill(self, now: float) -> None:
        for kind, bucket in self.buckets.items():
            bucket.refill(now, bucket.capacity - self.held(kind))


class Ledger:
    """The authoritative quotas of every tenant (see the module docstring)."""

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        holder_ttl_s: float = HOLDER_TTL_S,
    ) -> None:
        self._clock = clock
        self._wall = wall
        self.holder_ttl_s = holder_ttl_s
        self.accounts: dict[str, _Account] = {}
        self._seen: dict[str, float] = {}  # replica -> when it last called
        self._last_call = clock()
        self._swept = clock()
        self.since = wall()  # the usage figures count from here
        self._usage: dict[str, dict[str, Any]] = {}  # replica -> its cumulative usage report
        self._retired: dict[str, dict[str, Any]] = {}  # the figures of replicas forgotten

    def idle_s(self) -> float:
        """Seconds since any replica last called."""
        return self._clock() - self._last_call

    def exchange(
        self,
        replica: str,
        items: list[dict[str, Any]],
        usage: dict[str, dict[str, Any]] | None = None,
    ) -> list[dict[str, Any]]:
        """One replica's exchange, an answer per item, and its cumulative `usage` report (row ->
        figures: `requests`, `prompt_tokens`, `output_tokens`, `tokens`, `refused` as quota ->
        count, and `day`/`tokens_today`), if it sent one. An item: `account` (a tenant), `quotas`
        (its quotas as a dict), `day` (the UTC day of the replica's daily slice), `give` (kind ->
        amount given back; negative: owed), `held` (kind -> what it holds after giving), `want`
        (kind -> amount it would like) and `need` (kind -> the least worth granting). The answer:
        `granted` (kind -> amount), `wait` (kind -> seconds until `need` could be granted, for
        kinds not granted), `free` (kind -> what is left to grant), `replicas` (how many it hears
        from) and `day` (the ledger's UTC day: a replica on another day drops its daily slice).
        Called with no items, it only tells the ledger the replica lives."""
        now, wall = self._clock(), self._wall()
        self._last_call = now
        self._seen[replica] = now
        self._expire(now, wall)
        if usage is not None:
            self._usage[replica] = usage
        if now - self._swept >= SWEEP_S:
            self.sweep(now)
        return [self._exchange(replica, item, now, wall) for item in items]

    def _expire(self, now: float, wall: float) -> None:
        gone = [r for r, at in self._seen.items() if now - at > self.holder_ttl_s]
        for replica in gone:
            del self._seen[replica]
            for account in self.accounts.values():
                account.outstanding.pop(replica, None)
            for row, figures in self._usage.pop(replica, {}).items():
                _add_usage(self._retired.setdefault(row, {}), figures, int(wall // DAY_S))

    def sweep(self, now: float | None = None) -> None:
        """Forget keys' accounts at rest: held by no replica, their buckets full again."""
        now = self._clock() if now is None else now
        self._swept = now
        for name in [n for n in self.accounts if n.startswith(KEY_PREFIX)]:
            account = self.accounts[name]
            account.refill(now)
            at_rest = account.day is None and not any(account.held(k) for k in KINDS)
            if at_rest and all(b.level >= b.capacity for b in account.buckets.values()):
                del self.accounts[name]

    def usage(self) -> dict[str, Any]:
        """The cluster's usage per row (tenant, or `KEYS_ROW`) since `since`: each replica's
        last report plus those of replicas forgotten; with each tenant account's `snapshot`."""
        today = int(self._wall() // DAY_S)
        rows: dict[str, dict[str, Any]] = {}
        for row, figures in self._retired.items():
            _add_usage(rows.setdefault(row, {}), figures, today)
        for report in self._usage.values():
            for row, figures in report.items():
                _add_usage(rows.setdefault(row, {}), figures, today)
        accounts = {n: self.snapshot(n) for n in self.accounts if not n.startswith(KEY_PREFIX)}
        return {
            "rows": rows,
            "accounts": accounts,
            "key_accounts": sum(n.startswith(KEY_PREFIX) for n in self.accounts),
            "since": self.since,
            "replicas": len(self._seen),
        }

    def _exchange(
        self, replica: str, item: dict[str, Any], now: float, wall: float
    ) -> dict[str, Any]:
        name, quotas = item["account"], item.get("quotas") or {}
        account = self.accounts.get(name)
        if account is None:
            account = self.accounts[name] = _Account(quotas, now)
        else:
            account.configure(quotas, now)
        give, held = item.get("give") or {}, item.get("held") or {}
        want, need = item.get("want") or {}, item.get("need") or {}
        today = account.day.roll(wall) if account.day is not None else int(wall // DAY_S)
        mine = account.outstanding.setdefault(replica, {})
        for kind, bucket in account.buckets.items():
            bucket.refill(now, bucket.capacity - account.held(kind))
            bucket.level += give.get(kind, 0.0)  # may go below 0: a debt refilled later
            mine[kind] = held.get(kind, 0.0)
        if account.day is not None and item.get("day") == today:
            account.day.take(-give.get("day", 0.0))
        if account.slots:
            mine["slots"] = held.get("slots", 0.0)
        granted: dict[str, float] = {}
        wait: dict[str, float] = {}
        for kind, amount in want.items():
            least = need.get(kind, 0.0)
            available, waiting = self._available(account, kind, least, now, wall)
            amount = min(amount, available)
            if amount > 0 and amount >= least:
                self._grant(account, mine, kind, amount)
                granted[kind] = amount
            elif least > 0:
                wait[kind] = waiting
        kinds = [*account.buckets, *(["day"] if account.day else []), "slots"]
        free = {k: self._available(account, k, 0.0, now, wall)[0] for k in kinds}
        replicas = len(self._seen)
        return {"granted": granted, "wait": wait, "day": today, "free": free, "replicas": replicas}

    def _available(
        self, account: _Account, kind: str, least: float, now: float, wall: float
    ) -> tuple[float, float]:
        """What could be granted of `kind` now, and the seconds until `least` could be."""
        if kind in account.buckets:
            bucket = account.buckets[kind]
            bucket.refill(now, bucket.capacity - account.held(kind))
            level = bucket.level
            if level >= least:
                return max(0.0, level), 0.0
            return max(0.0, level), (least - level) / bucket.rate
        if kind == "day" and account.day is not None:
            day = account.day
            free = day.limit - day.used
            return max(0.0, free), 0.0 if free >= least else (day.day + 1) * DAY_S - wall
        if kind == "slots" and account.slots:
            return float(max(0, account.slots - round(account.held("slots")))), 1.0
        return 0.0, 1.0  # a kind this tenant's quotas do not limit

    @staticmethod
    def _grant(account: _Account, mine: dict[str, float], kind: str, amount: float) -> None:
        if kind in account.buckets:
            account.buckets[kind].level -= amount
            mine[kind] = mine.get(kind, 0.0) + amount
        elif kind == "day" and account.day is not None:
            account.day.take(amount)
        elif kind == "slots":
            mine[kind] = mine.get(kind, 0.0) + amount

    def snapshot(self, name: str) -> dict[str, float]:
        """An account's figures (for tests and operators): each bucket's level, the tokens used
        today (slices included) and what the replicas hold of each kind."""
        account = self.accounts.get(name)
        if account is None:
            return {}
        account.refill(self._clock())
        figures = {f"{kind}_level": bucket.level for kind, bucket in account.buckets.items()}
        if account.day is not None:
            figures["day_used"] = account.day.used
        for kind in KINDS:
            if held := account.held(kind):
                figures[f"{kind}_held"] = held
        return figures


def _add_usage(total: dict[str, Any], figures: dict[str, Any], today: int) -> None:
    """Add one replica's figures (for one row) to `total`; `tokens_today` counts only today's."""
    for name in USAGE_COUNTS:
        total[name] = total.get(name, 0) + int(figures.get(name, 0))
    refused = total.setdefault("refused", {})
    for quota, count in (figures.get("refused") or {}).items():
        refused[quota] = refused.get(quota, 0) + int(count)
    if total.get("day") != today:
        total["day"], total["tokens_today"] = today, 0
    if figures.get("day") == today:
        total["tokens_today"] += int(figures.get("tokens_today", 0))


class LocalLedger:
    """A `Ledger` in this process, with the client's interface (tests, a single process)."""

    def __init__(self, ledger: Ledger | None = None) -> None:
        self.ledger = ledger or Ledger()

    async def exchange(
        self,
        replica: str,
        items: list[dict[str, Any]],
        usage: dict[str, dict[str, Any]] | None = None,
    ) -> list[dict[str, Any]]:
        return self.ledger.exchange(replica, items, usage)

    async def usage(self) -> dict[str, Any]:
        return self.ledger.usage()

    async def close(self) -> None:
        return None


class LedgerActor:
    """The `Ledger` as a Ray actor (`ray.remote(LedgerActor)`, async so it can watch itself)."""

    def __init__(self, idle_exit_s: float = IDLE_EXIT_S) -> None:
        self.ledger = Ledger()
        self.idle_exit_s = idle_exit_s
        self._watch: asyncio.Task | None = None

    async def exchange(
        self,
        replica: str,
        items: list[dict[str, Any]],
        usage: dict[str, dict[str, Any]] | None = None,
    ) -> list[dict[str, Any]]:
        if self._watch is None:
            self._watch = asyncio.create_task(self._end_when_idle())
        return self.ledger.exchange(replica, items, usage)

    async def snapshot(self, name: str) -> dict[str, float]:
        return self.ledger.snapshot(name)

    async def usage(self) -> dict[str, Any]:
        return self.ledger.usage()

    async def _end_when_idle(self) -> None:
        await end_when_idle(self.ledger.idle_s, self.idle_exit_s, "ledger")


def ledger_name(app_name: str) -> str:
    """The ledger actor's name for a Serve application (in namespace `NAMESPACE`)."""
    return f"ledger:{app_name}"


class ActorLedger:
    """The client of an application's ledger actor: gets it, or creates it (detached, so it
    outlives a redeploy's replicas; it ends itself once idle for `idle_exit_s`)."""

    def __init__(self, name: str, *, idle_exit_s: float = IDLE_EXIT_S) -> None:
        self.name = name
        self.idle_exit_s = idle_exit_s
        self._handle: Any = None

    def handle(self) -> Any:
        if self._handle is None:
            import ray

            self._handle = (
                ray.remote(LedgerActor)
                .options(
                    name=self.name,
                    namespace=NAMESPACE,
                    lifetime="detached",
                    get_if_exists=True,
                    num_cpus=0,
                    max_restarts=0,
                )
                .remote(self.idle_exit_s)
            )
        return self._handle

    async def exchange(
        self,
        replica: str,
        items: list[dict[str, Any]],
        usage: dict[str, dict[str, Any]] | None = None,
    ) -> list[dict[str, Any]]:
        try:
            return await self.handle().exchange.remote(replica, items, usage)
        except Exception:
            self._handle = None  # gone (idle, or its node lost): get or create it next time
            raise

    async def usage(self) -> dict[str, Any]:
        """The cluster's usage figures (`Ledger.usage`)."""
        try:
            return await self.handle().usage.remote()
        except Exception:
            self._handle = None
            raise

    async def close(self) -> None:
        self._handle = None
