"""A tenant's quota held across 3 ingress replicas and a redeploy by the application's ledger
actor (`app.tenants.ledger`), in front of a simulated engine (`benchmarks.simulated_engine`)."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
import ray
from ray import serve

from app.config import load_config
from app.tenants.ledger import NAMESPACE, ActorLedger, ledger_name
from benchmarks.simulated_engine import simulated_stack
from tests.e2e.conftest import wait_healthy
from tests.e2e.test_reliability import replica_processes

pytestmark = pytest.mark.e2e
APP = "quotas"
KEY = "sk-quota-tenant"
BURST = 20
RATE = 0.05  # requests per second: one more every 20 s
IDLE_EXIT_S = 8.0  # the test's ledger ends this long after the last replica is gone
BODY = {"model": "sim", "prompt": "hello", "max_tokens": 4}


def deploy(timeout_s: float) -> None:
    """The stack with 3 ingress replicas and a tenant of `BURST` requests (a changed
    `timeout_s` replaces every ingress replica)."""
    config = load_config(
        {
            "models": [{"name": "sim", "source": "org/sim", "replicas": 1}],
            "server": {"ingress_replicas": 3, "request_timeout_s": timeout_s},
            "tenants": [
                {
                    "name": "a",
                    "api_keys": [KEY],
                    "quotas": {"requests_per_second": RATE, "burst": BURST},
                }
            ],
        }
    )
    serve.run(simulated_stack(config, delay_s=0.01), name=APP, route_prefix="/")


async def _hammer(base: str, rounds: int = 4, per_round: int = 40) -> list[int]:
    headers = {"authorization": f"Bearer {KEY}"}
    limits = httpx.Limits(max_connections=16, max_keepalive_connections=0)  # new connections:
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=60) as client:  # spread

        async def one() -> int:
            return (await client.post("/v1/completions", json=BODY, headers=headers)).status_code

        codes: list[int] = []
        for _ in range(rounds):
            codes += await asyncio.gather(*(one() for _ in range(per_round)))
            await asyncio.sleep(0.5)
        return codes


def hammer(base: str) -> int:
    codes = asyncio.run(_hammer(base))
    assert set(codes) <= {200, 429}, {c: codes.count(c) for c in set(codes)}
    return codes.count(200)


def ledger_alive() -> bool:
    try:
        ray.get_actor(ledger_name(APP), namespace=NAMESPACE)
    except ValueError:
        return False
    return True


def test_three_ingress_replicas_and_a_redeploy_share_one_quota(cluster):
    started = time.monotonic()
    # The application's ledger, made first with a short idle exit (the ingress gets it).
    ActorLedger(ledger_name(APP), idle_exit_s=IDLE_EXIT_S).handle()
    try:
        deploy(300)
        wait_healthy(cluster.base_url)
        before = {p.pid for p in replica_processes(APP, "ingress")}
        assert len(before) == 3
        first = hammer(cluster.base_url)
        deploy(301)  # a redeploy: 3 new ingress replicas
        wait_healthy(cluster.base_url)
        after = {p.pid for p in replica_processes(APP, "ingress")}
        assert len(after) == 3 and not after & before
        second = hammer(cluster.base_url)
        bound = BURST + RATE * (time.monotonic() - started)
        # 3 replicas with their own buckets, and afresh after the redeploy: up to 6 x BURST.
        assert first + second <= bound, (first, second, bound)
        assert first >= BURST // 2 and first + second >= BURST - 3, (first, second)
    finally:
        serve.delete(APP)
    deadline = time.monotonic() + IDLE_EXIT_S + 15
    while ledger_alive() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not ledger_alive(), "the ledger outlived its application"
