"""Tenants' quotas shared by ingress replicas through one ledger (`app.tenants.ledger`), each
replica spending slices of the budget (`app.ingress.limits`): simulated replicas in one process
against a `Ledger`, on a manual clock."""

from __future__ import annotations

import asyncio
import random

import pytest

from app.config import KeyLimits, TenantQuotas
from app.ingress import limits as limits_module
from app.ingress.auth import ANONYMOUS
from app.ingress.limits import DAY_S, SYNC_S, KeyLimiter, QuotaError
from app.tenants.ledger import KEY_PREFIX, Ledger, LocalLedger

START_WALL = 1_700_000_000.0  # wall time at clock 0


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t

    def wall(self) -> float:
        return START_WALL + self.t


def cluster(quotas: TenantQuotas, replicas: int = 3, **ledger_options):
    """`replicas` limiters sharing one ledger, and the ledger."""
    clock = Clock()
    ledger = Ledger(clock=clock, wall=clock.wall, **ledger_options)
    limiters = [replica(ledger, clock, quotas, f"r{i}") for i in range(replicas)]
    return clock, ledger, limiters


def replica(ledger: Ledger, clock: Clock, quotas: TenantQuotas, name: str) -> KeyLimiter:
    limiter = KeyLimiter(KeyLimits(), clock, tenants={"t": quotas}, wall=clock.wall)
    limiter.share(LocalLedger(ledger), name)
    return limiter


async def charged(limiter: KeyLimiter, tokens: int, used: int):
    """A request of `tokens` admitted by `limiter` (its slice awaited), settled to `used`."""
    await limiter.ready("k", tokens, "t")
    lease = limiter.acquire("k", tokens, "t")
    lease.settle(used)
    return lease


async def sync_all(limiters) -> None:
    for limiter in limiters:
        await limiter.sync()


async def hammer(
    clock,
    limiters,
    seconds,
    *,
    per_step=4,
    sizes=(10, 200),
    seed=0,
    hold=(0, 0),
    used=None,
    key="k",
    tenant="t",
):
    """Requests at random replicas every 10 ms for `seconds` (more than the quota allows),
    each replica exchanging every `SYNC_S`; admitted requests, tokens charged (each answer
    settled to `used` of its estimate, if given), and the most in flight."""
    rnd = random.Random(seed)
    admitted = tokens = most = 0
    leases = []
    step_s = 0.01
    for step in range(round(seconds / step_s)):
        clock.t += step_s
        for _ in range(per_step):
            try:
                lease = rnd.choice(limiters).acquire(key, rnd.randint(*sizes), tenant)
            except QuotaError as exc:
                assert exc.status == 429 and int(exc.headers["retry-after"]) >= 1
                continue
            admitted += 1
            if used is not None:
                lease.settle(round(lease.tokens * rnd.uniform(*used)))
            tokens += lease.tokens
            leases.append((clock.t + rnd.uniform(*hold), lease))
        most = max(most, len(leases))
        for _at, lease in [x for x in leases if x[0] <= clock.t]:
            lease.release()
        leases = [x for x in leases if x[0] > clock.t]
        await asyncio.sleep(0)  # the exchanges requests started
        if step % round(SYNC_S / step_s) == 0:
            await sync_all(limiters)
    for _, lease in leases:
        lease.release()
    return admitted, tokens, most


@pytest.mark.parametrize(("seed", "used"), [(0, None), (1, None), (2, (0.1, 1.0))])
def test_three_replicas_admit_no_more_than_one_bucket(seed, used):
    quotas = TenantQuotas(tokens_per_minute=6000, requests_per_second=5, burst=10)
    clock, _ledger, limiters = cluster(quotas)

    async def run():
        await sync_all(limiters)
        return await hammer(clock, limiters, 120, seed=seed, used=used)

    admitted, tokens, _ = asyncio.run(run())
    elapsed = clock.t
    # One bucket of the quota's size admits at most its capacity plus its refill.
    assert tokens <= 6000 + 6000 / 60 * elapsed
    assert admitted <= 10 + 5 * elapsed
    # ...and the slices strand little of it: the binding limit is nearly reached.
    assert tokens >= 0.97 * (6000 + 100 * elapsed) or admitted >= 0.97 * (10 + 5 * elapsed)
    # Three replicas with their own buckets would have admitted about three times as much.


def test_without_a_ledger_each_replica_has_the_whole_quota():
    quotas = TenantQuotas(requests_per_second=1, burst=5)
    limiters = [KeyLimiter(KeyLimits(), tenants={"t": quotas}) for _ in range(3)]
    admitted = 0
    for limiter in limiters:
        for _ in range(5):
            limiter.acquire("k", 1, "t")
            admitted += 1
    assert admitted == 15  # what the shared ledger prevents


def test_concurrent_requests_across_replicas_never_exceed_max_concurrent():
    quotas = TenantQuotas(max_concurrent=6)
    clock, _ledger, limiters = cluster(quotas)

    async def run():
        await sync_all(limiters)
        return await hammer(clock, limiters, 30, hold=(0.05, 1.0))

    admitted, _, most = asyncio.run(run())
    assert most <= 6
    assert most >= 5 and admitted > 60  # slots move to where the requests are


def test_a_refund_is_spendable_once_the_ledger_knows_it():
    quotas = TenantQuotas(tokens_per_minute=1200)  # 20 tokens a second
    clock, _ledger, (a, b) = cluster(quotas, replicas=2)

    async def run():
        (await charged(a, 1000, 100)).release()  # 900 back
        with pytest.raises(QuotaError) as refused:
            a.acquire("k", 900, "t")  # not before the ledger is told
        assert refused.value.quota == "tokens_per_minute"
        await a.sync()
        await a.ready("k", 1000, "t")
        a.acquire("k", 1000, "t")  # the refund, no time passed

    asyncio.run(run())
    assert clock.t == 0
    with pytest.raises(QuotaError):
        b.acquire("k", 100, "t")


def test_an_answer_using_more_than_reserved_is_owed_to_the_ledger():
    quotas = TenantQuotas(tokens_per_minute=600)  # 10 tokens a second
    _clock, ledger, (a, b) = cluster(quotas, replicas=2)

    async def run():
        await charged(a, 300, 500)  # 200 more than reserved
        await a.sync(close=True)
        figures = ledger.snapshot("t")
        assert figures["tokens_level"] == pytest.approx(100, abs=1)  # 600 - 500
        await b.ready("k", 101, "t")
        with pytest.raises(QuotaError):
            b.acquire("k", 101, "t")

    asyncio.run(run())


def test_the_daily_count_is_the_clusters_and_survives_new_replicas():
    quotas = TenantQuotas(tokens_per_day=1000)
    clock, ledger, limiters = cluster(quotas)

    async def spend(limiters, count):
        admitted = 0
        for i in range(count):
            limiter = limiters[i % len(limiters)]
            await limiter.ready("k", 100, "t")
            try:
                limiter.acquire("k", 100, "t").release()
                admitted += 1
            except QuotaError as exc:
                assert exc.quota == "tokens_per_day"
            clock.t += 0.1
        await sync_all(limiters)
        return admitted

    async def run():
        first = await spend(limiters, 7)
        for limiter in limiters:  # a redeploy: the old replicas give back, new ones start
            await limiter.close()
        fresh = [replica(ledger, clock, quotas, f"new{i}") for i in range(3)]
        second = await spend(fresh, 20)
        refused = None
        try:
            fresh[0].acquire("k", 100, "t")
        except QuotaError as exc:
            refused = exc
        clock.t += DAY_S  # the next UTC day
        third = await spend(fresh, 3)
        return first, second, refused, third

    first, second, refused, third = asyncio.run(run())
    assert first == 7
    assert first + second == 10  # 1000 tokens in the day, across both generations
    assert refused is not None and int(refused.headers["retry-after"]) > 3600
    assert third == 3


def test_a_replica_that_vanishes_gives_its_slices_back_after_the_ttl():
    quotas = TenantQuotas(max_concurrent=2)
    clock, _ledger, (a, b) = cluster(quotas, replicas=2, holder_ttl_s=5)

    async def run():
        await a.ready("k", 1, "t")
        a.acquire("k", 1, "t")
        await a.ready("k", 1, "t")
        a.acquire("k", 1, "t")  # a holds both slots, then dies
        await b.ready("k", 1, "t")
        with pytest.raises(QuotaError) as refused:
            b.acquire("k", 1, "t")
        assert refused.value.quota == "max_concurrent"
        clock.t += 6
        await b.ready("k", 1, "t")
        b.acquire("k", 1, "t")

    asyncio.run(run())


def key_cluster(per_key: KeyLimits, replicas: int = 3):
    """`replicas` limiters with `per_key` limits (no tenant) sharing one ledger."""
    clock = Clock()
    ledger = Ledger(clock=clock, wall=clock.wall)
    limiters = []
    for i in range(replicas):
        limiter = KeyLimiter(per_key, clock, wall=clock.wall)
        limiter.share(LocalLedger(ledger), f"r{i}")
        limiters.append(limiter)
    return clock, ledger, limiters


@pytest.mark.parametrize("replicas", [2, 3])
def test_per_key_limits_hold_across_replicas(replicas):
    per_key = KeyLimits(requests_per_second=5, burst=10, tokens_per_minute=6000)
    clock, ledger, limiters = key_cluster(per_key, replicas)
    key_id = "0123456789ab"

    async def run():
        await sync_all(limiters)
        return await hammer(clock, limiters, 60, key=key_id, tenant=None)

    admitted, tokens, _ = asyncio.run(run())
    elapsed = clock.t
    assert tokens <= 6000 + 100 * elapsed and admitted <= 10 + 5 * elapsed
    assert tokens >= 0.95 * (6000 + 100 * elapsed) or admitted >= 0.95 * (10 + 5 * elapsed)
    # The account is named by the key id (the digest prefix the ingress passes), nothing else.
    assert list(ledger.accounts) == [KEY_PREFIX + key_id]
    # Another key has its own account, and its whole budget.
    assert all(limiter.key_accounts == 1 for limiter in limiters)


def test_per_key_max_concurrent_holds_across_replicas():
    clock, _ledger, limiters = key_cluster(KeyLimits(max_concurrent=4))

    async def run():
        await sync_all(limiters)
        return await hammer(clock, limiters, 20, hold=(0.05, 1.0), key="abc", tenant=None)

    admitted, _, most = asyncio.run(run())
    assert most <= 4 and admitted > 30


def test_a_keys_first_request_waits_for_its_slice_then_is_admitted():
    clock, _ledger, limiters = key_cluster(KeyLimits(requests_per_second=1, burst=8))

    async def run():
        for limiter in limiters:  # a new key on each replica: one exchange awaited, admitted
            await limiter.ready("key1", 1)
            limiter.acquire("key1", 1).release()
        admitted, refused = 3, 0
        while refused < 6:  # then the rest of the bucket, wherever the requests come
            limiter = limiters[(admitted + refused) % 3]
            await limiter.ready("key1", 1)
            try:
                limiter.acquire("key1", 1).release()
                admitted += 1
            except QuotaError as exc:
                assert exc.quota == "requests_per_second"
                refused += 1
        return admitted

    assert asyncio.run(run()) == 8  # the burst, once, across the 3 replicas
    assert clock.t == 0


def test_anonymous_callers_stay_in_the_replicas_memory():
    _clock, ledger, (a, b) = key_cluster(KeyLimits(requests_per_second=1, burst=2), 2)
    for limiter in (a, b):  # each replica: its own bucket, as before
        limiter.acquire(ANONYMOUS, 1)
        limiter.acquire(ANONYMOUS, 1)
        with pytest.raises(QuotaError):
            limiter.acquire(ANONYMOUS, 1)
    assert not ledger.accounts and a.key_accounts == 0


def test_idle_keys_accounts_are_given_back_and_dropped():
    clock, ledger, (a, b) = key_cluster(KeyLimits(requests_per_second=2, burst=4), 2)

    async def run():
        for i in range(5):
            await a.ready(f"key{i}", 1)
            a.acquire(f"key{i}", 1).release()
        await a.sync()
        assert a.key_accounts == 5 and len(ledger.accounts) == 5
        for _ in range(70):  # idle past KEY_IDLE_DROP_S, exchanging as the ingress does
            clock.t += 0.5
            await sync_all([a, b])
        assert a.key_accounts == 0
        assert all(not ledger.snapshot(n).get("requests_held") for n in ledger.accounts)
        ledger.sweep()  # full again, held by nobody: forgotten
        assert not ledger.accounts

    asyncio.run(run())


def test_a_replica_holds_at_most_max_key_accounts_idle(monkeypatch):
    monkeypatch.setattr(limits_module, "MAX_KEY_ACCOUNTS", 3)
    clock, ledger, (a,) = key_cluster(KeyLimits(requests_per_second=2, burst=4), 1)

    async def run():
        for i in range(10):
            await a.ready(f"key{i}", 1)
            a.acquire(f"key{i}", 1).release()
            clock.t += 0.01
        await a.ready("key0", 1)
        busy = a.acquire("key0", 1)  # the oldest key, in flight: kept whatever the cap
        await a.sync()
        assert a.key_accounts == 3 and "key0" in a._key_shared
        assert sum(ledger.snapshot(n).get("requests_held", 0) > 0 for n in ledger.accounts) <= 3
        busy.release()

    asyncio.run(run())


def test_a_request_larger_than_the_quota_is_a_400_not_a_429():
    quotas = TenantQuotas(tokens_per_minute=100)
    _, _, (a,) = cluster(quotas, replicas=1)
    with pytest.raises(QuotaError) as refused:
        a.acquire("k", 101, "t")
    assert refused.value.status == 400 and refused.value.quota == "tokens_per_minute"


def test_an_idle_replica_gives_back_what_a_small_quota_cannot_spare():
    quotas = TenantQuotas(requests_per_second=0.5, burst=2)
    clock, _ledger, (a, b, c) = cluster(quotas)

    async def run():
        await sync_all([a, b, c])  # each takes a slice of one request
        clock.t += 3  # idle past IDLE_RETURN_S
        await sync_all([a, b])
        await c.ready("k", 1, "t")
        c.acquire("k", 1, "t")
        await c.ready("k", 1, "t")
        c.acquire("k", 1, "t")  # the bucket's 2, though a and b were first

    asyncio.run(run())


def test_slices_held_by_replicas_count_in_the_bucket():
    """A full bucket admits its capacity at once, however much of it replicas held while it
    refilled."""
    quotas = TenantQuotas(tokens_per_minute=6000)
    clock, _ledger, limiters = cluster(quotas)

    async def run():
        for _ in range(120):  # each replica holds a slice while the bucket refills
            clock.t += 1
            for limiter in limiters:
                await limiter.ready("k", 1000, "t")
                limiter.acquire("k", 1, "t").release()
                await limiter.sync()
        assert all(limiter._shared["t"].held["tokens"] >= 100 for limiter in limiters)
        admitted = refused = 0
        while refused < 10:
            limiter = limiters[(admitted + refused) % 3]
            await limiter.ready("k", 100, "t")
            try:
                admitted += limiter.acquire("k", 100, "t").tokens
            except QuotaError:
                refused += 1
        return admitted

    assert 5600 <= asyncio.run(run()) <= 6000


def test_an_idle_replica_keeps_one_requests_slice_of_a_large_quota():
    quotas = TenantQuotas(requests_per_second=5, burst=20, tokens_per_minute=60000)
    clock, ledger, limiters = cluster(quotas)

    async def run():
        for limiter in limiters:
            await charged(limiter, 500, 500)
        for _ in range(20):  # idle for 10 s, exchanging as the ingress does
            clock.t += 0.5
            await sync_all(limiters)
        assert ledger.snapshot("t")["requests_held"] == 3
        for limiter in limiters:  # admitted at once, no exchange awaited
            limiter.acquire("k", 450, "t")  # (the slice kept: the largest request lately)

    asyncio.run(run())


def test_a_replica_cut_off_from_the_ledger_stops_spending_its_slices():
    """The ledger counts a silent replica's slices spent after its TTL and refills in their
    place; the replica, silent longer than its own shorter TTL, no longer spends them."""
    quotas = TenantQuotas(tokens_per_minute=6000)
    clock, _ledger, (a, b) = cluster(quotas, replicas=2)

    async def run():
        await a.ready("k", 1000, "t")  # a holds 1000 or more, then hears nothing for 120 s
        clock.t += 120
        admitted = 0
        while True:
            await b.ready("k", 100, "t")
            try:
                admitted += b.acquire("k", 100, "t").tokens
            except QuotaError:
                break
        with pytest.raises(QuotaError):
            a.acquire("k", 1000, "t")
        return admitted

    assert 5500 <= asyncio.run(run()) <= 6000


def test_a_closing_replica_gives_back_its_refunds_too():
    quotas = TenantQuotas(tokens_per_minute=600)
    clock, ledger, (a, b) = cluster(quotas, replicas=2)

    async def run():
        (await charged(a, 500, 0)).release()  # all 500 refunded, the ledger not told yet
        await a.sync(close=True)
        assert ledger.snapshot("t")["tokens_level"] == pytest.approx(600)
        await b.ready("k", 600, "t")
        b.acquire("k", 600, "t")  # the whole quota, no time passed

    asyncio.run(run())
    assert clock.t == 0
