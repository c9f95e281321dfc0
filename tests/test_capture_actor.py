"""The application's capture store as a real Ray actor (`app.capture.store`): every replica's
client reaches the one named, detached actor, which ends itself once no replica calls it."""

from __future__ import annotations

import asyncio
import time

import pytest
import ray

from app.capture import ActorStore, store_name
from app.lab.trace import TraceRequest
from app.tenants.ledger import NAMESPACE
from tests.conftest import Cluster

pytestmark = pytest.mark.e2e


def test_replicas_share_one_store_actor_that_ends_when_idle(cluster: Cluster) -> None:
    name = store_name("capture-test")
    first, second = ActorStore(name, 3, idle_exit_s=2.0), ActorStore(name, 3, idle_exit_s=2.0)
    records = [TraceRequest(float(t), "m", blocks=[t, t + 1], prompt_tokens=40) for t in range(4)]

    async def exchange() -> tuple[list[TraceRequest], dict]:
        await first.add(records[2:3])
        await second.add([records[3], records[0]], dropped=1)
        await first.add(records[1:2])
        return await second.read(1.0), await first.status()

    got, status = asyncio.run(exchange())
    assert [r.t for r in got] == [1.0, 3.0]  # the newest 3 kept, from `since`, in time order
    assert [list(r.blocks) for r in got] == [[1, 2], [3, 4]] and got[0].prompt_tokens == 40
    assert status["records"] == 3 and status["dropped"] == 2
    assert ray.get_actor(name, namespace=NAMESPACE) is not None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # no replica calls: it ends itself
        try:
            ray.get_actor(name, namespace=NAMESPACE)
        except ValueError:
            return
        time.sleep(0.5)
    ray.kill(ray.get_actor(name, namespace=NAMESPACE))
    pytest.fail("the capture store actor did not end when idle")
