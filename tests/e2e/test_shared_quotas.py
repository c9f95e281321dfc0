"""A tenant's quota held across 3 ingress replicas and a redeploy by the application's ledger
actor (`app.tenants.ledger`), in front of a simulated engine (`benchmarks.simulated_engine`);
the ledger's usage table (`GET /usage`) counts every replica's requests and refusals, and the
capture store actor (`app.capture.store`) holds every replica's answered requests as one trace
(`GET /capture`). Both actors end once the application is gone."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
import ray
from ray import serve

from app.capture.store import CaptureStore, store_name
from app.config import load_config
from app.lab.trace import parse_line
from app.shared_actor import Shared
from app.tenants.ledger import NAMESPACE, ActorLedger, ledger_name
from benchmarks.simulated_engine import simulated_stack
from tests.e2e.conftest import wait_healthy
from tests.e2e.test_reliability import replica_processes

pytestmark = pytest.mark.e2e
APP = "quotas"
KEY = "sk-quota-tenant"
OPERATOR = "sk-quota-operator"  # a key without a tenant: reads the capture
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
            "auth": {"api_keys": [OPERATOR], "api_keys_env": None},
            "capture": {"flush_s": 0.5},
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


REFUSED: list[int] = []  # 429s, across both hammers


def hammer(base: str) -> int:
    codes = asyncio.run(_hammer(base))
    assert set(codes) <= {200, 429}, {c: codes.count(c) for c in set(codes)}
    REFUSED.append(codes.count(429))
    return codes.count(200)


def alive(name: str) -> bool:
    try:
        ray.get_actor(name, namespace=NAMESPACE)
    except ValueError:
        return False
    return True


def test_three_ingress_replicas_and_a_redeploy_share_one_quota(cluster):
    started = time.monotonic()
    # The application's actors, made first with a short idle exit (the ingress gets them).
    ActorLedger(ledger_name(APP), idle_exit_s=IDLE_EXIT_S).handle()
    Shared(store_name(APP), CaptureStore, 10_000, idle_exit_s=IDLE_EXIT_S)._handle()
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
        # Both generations' replicas reported to the ledger: every answer and refusal counted.
        usage = httpx.get(f"{cluster.base_url}/usage", timeout=30).json()
        row = next(r for r in usage["tenants"] if r["tenant"] == "a")
        assert usage["scope"] == "cluster", usage
        assert row["requests"] == first + second, (row, first, second)
        assert row["refused_by_quota"] == {"requests_per_second": sum(REFUSED)}, row
        # Every answered request of both generations in one trace, oldest first.
        headers = {"authorization": f"Bearer {OPERATOR}"}
        captured = httpx.get(f"{cluster.base_url}/capture", headers=headers, timeout=30)
        assert captured.status_code == 200, captured.text
        lines = [parse_line(line) for line in captured.text.splitlines()]
        assert len(lines) == first + second, (len(lines), first, second)
        assert [r.t for r in lines] == sorted(r.t for r in lines) and lines[0].t == 0
        assert {(r.model, r.tenant, r.endpoint) for r in lines} == {("sim", "a", "completions")}
    finally:
        serve.delete(APP)
    deadline = time.monotonic() + IDLE_EXIT_S + 15
    names = (ledger_name(APP), store_name(APP))
    while any(alive(name) for name in names) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not any(alive(name) for name in names), "an actor outlived its application"
