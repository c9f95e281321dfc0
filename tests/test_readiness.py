"""Readiness: cached replica counts, refreshed in the background once a model is up."""

from __future__ import annotations

import asyncio

import pytest

from app.config import load_config
from app.errors import OpenAIError
from app.ingress.readiness import Readiness

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


class Counter:
    """A replica counter whose answers the test sets; counts its calls."""

    def __init__(self, running: int, *, fail: bool = False) -> None:
        self.running = running
        self.fail = fail
        self.calls = 0

    def __call__(self) -> dict[str, int]:
        self.calls += 1
        if self.fail:
            raise ConnectionError("controller unreachable")
        return {"engine:smollm2": self.running}


@pytest.fixture
def spec(cpu_model):
    return load_config({"models": [cpu_model]}).models[0]


async def test_a_ready_model_is_answered_from_the_cache_and_refreshed_in_the_background(spec):
    counter = Counter(2)
    readiness = Readiness(counter, ttl_s=0, ready_ttl_s=0)
    assert (await readiness.state(spec)).running_replicas == 2
    counter.running = 0
    # The stale count answers at once; the refresh it starts lands before the next check.
    assert (await readiness.state(spec)).running_replicas == 2
    await asyncio.sleep(0.05)
    assert (await readiness.state(spec)).running_replicas == 0
    with pytest.raises(OpenAIError) as err:
        await readiness.require(spec)
    assert err.value.status == 503


async def test_a_model_without_replicas_waits_for_a_fresh_count(spec):
    counter = Counter(0)
    readiness = Readiness(counter, ttl_s=0, ready_ttl_s=60)
    assert not (await readiness.state(spec)).ready
    counter.running = 1
    assert (await readiness.state(spec)).ready  # not the cached 0
    calls = counter.calls
    for _ in range(20):  # up: served from the cache until ready_ttl_s passes
        await readiness.require(spec)
    assert counter.calls == calls


async def test_concurrent_checks_share_one_controller_call(spec):
    counter = Counter(1)
    readiness = Readiness(counter, ttl_s=60)
    await asyncio.gather(*(readiness.require(spec) for _ in range(50)))
    assert counter.calls == 1


async def test_a_failing_background_refresh_keeps_the_last_counts(spec, caplog):
    counter = Counter(1)
    readiness = Readiness(counter, ttl_s=0, ready_ttl_s=0)
    await readiness.require(spec)
    counter.fail = True
    await readiness.require(spec)
    await asyncio.sleep(0.05)
    await readiness.require(spec)
    assert "replica counts not refreshed" in caplog.text
