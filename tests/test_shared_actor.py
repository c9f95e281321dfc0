"""An application's shared object as a real Ray actor (`app.shared_actor`), with the capture
store as the object: every replica's client reaches the one named, detached actor, which ends
itself once no replica calls it, and lives on while a client keeps it alive."""

from __future__ import annotations

import asyncio
import time

import pytest
import ray

from app.capture import CaptureStore, store_name
from app.lab.trace import TraceRequest
from app.shared_actor import NAMESPACE, Local, Shared, shared
from tests.conftest import Cluster

pytestmark = pytest.mark.e2e


def test_replicas_share_one_store_actor_that_ends_when_idle(cluster: Cluster) -> None:
    name = store_name("capture-test")
    first, second = (Shared(name, CaptureStore, 3, idle_exit_s=2.0) for _ in range(2))
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


def test_a_client_keeping_it_alive_outlives_quiet_spells(cluster: Cluster) -> None:
    name = store_name("keep-alive-test")

    async def quiet() -> None:
        kept = Shared(name, CaptureStore, 3, idle_exit_s=2.0, keep_alive_s=0.5)
        await kept.status()  # made; then no call but the client's keep-alive for 4 s
        await asyncio.sleep(4)
        assert ray.get_actor(name, namespace=NAMESPACE) is not None
        kept._beat.cancel()

    asyncio.run(quiet())
    ray.kill(ray.get_actor(name, namespace=NAMESPACE))


def test_outside_a_replica_the_object_is_local() -> None:
    store = shared("capture", CaptureStore, 3)
    assert isinstance(store, Local) and isinstance(store.target, CaptureStore)
    assert asyncio.run(store.status())["records"] == 0
