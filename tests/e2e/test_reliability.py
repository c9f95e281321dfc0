"""Load and fault tests through the real Ray Serve proxy, ingress and request router, in front
of simulated engine replicas (`benchmarks.simulated_engine`: a simulator, no model). Loopback only,
bounded in count and time."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import psutil
import pytest
import ray
from ray import serve

from app.config import load_config
from benchmarks.simulated_engine import simulated_stack
from tests.e2e.conftest import wait_healthy

pytestmark = pytest.mark.e2e
MODEL = {"name": "sim", "source": "org/sim", "replicas": 2}
BODY = {"model": "sim", "prompt": "hello", "max_tokens": 4}
HAPROXY_ERROR = "Internal Server Error"  # the body of Ray's HAProxy error file (never ours)


def deploy_simulated(
    name: str,
    *,
    delay_s: float,
    timeout_s: float = 300,
    server: dict | None = None,
    engine_options: dict | None = None,
    **engine_args: object,
) -> None:
    """The stack of `MODEL` with simulated engine replicas, as application `name` on "/"."""
    server = {"retries": 3, "request_timeout_s": timeout_s, **(server or {})}
    config = load_config({"models": [MODEL], "server": server})
    app = simulated_stack(config, engine_options=engine_options, delay_s=delay_s, **engine_args)
    serve.run(app, name=name, route_prefix="/")


def replica_processes(app_name: str, deployment: str) -> list[psutil.Process]:
    """The processes of the deployment's replicas."""
    mark = f"ServeReplica:{app_name}:{deployment}"
    return [p for p in psutil.process_iter(["cmdline"])
            if any(mark in part for part in p.info["cmdline"] or [])]  # fmt: skip


def ingress_rss_mb(app_name: str) -> float:
    """The resident memory of the application's ingress replicas, together."""
    found = replica_processes(app_name, "ingress")
    if not found:
        raise LookupError("ingress replica process not found")
    return sum(proc.memory_info().rss for proc in found) / 2**20


async def _fire(
    base: str, count: int, concurrency: int, body: dict, resent: list[int] | None = None
) -> list[int]:
    """The statuses of `count` completions, `concurrency` at a time on keep-alive connections
    (-1: no answer). With `resent`, a request whose connection dropped without an answer is sent
    once more, as the openai client does, and counted in `resent`: while Serve's HAProxy reloads
    (a replica added or removed), the old process closes its idle keep-alive connections, and a
    client reusing one at that instant gets a reset (haproxy/haproxy#3472, "the client must
    retry"; ray-project/ray#66056); a killed ingress replica drops what it carried. So is one
    that HAProxy answers itself for a replica that died with it (Ray's HAProxy config sends its
    plain-text `500 Internal Server Error` file for a 502, 503 or 504), as the openai client
    resends any 5xx."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=120) as client:

        async def one() -> int:
            for attempt in range(2 if resent is not None else 1):
                try:
                    answer = await client.post("/v1/completions", json=body)
                    if answer.status_code != 200:  # shown with a failed test's output
                        print(f"answer {answer.status_code}: {answer.text[:300]!r}")
                    if resent is None or attempt or answer.text != HAPROXY_ERROR:
                        return answer.status_code
                    resent.append(1)
                except httpx.TimeoutException:
                    return -1
                except httpx.TransportError:
                    if resent is not None and attempt == 0:
                        resent.append(1)
                except httpx.HTTPError:
                    return -1
            return -1

        return await asyncio.gather(*(one() for _ in range(count)))


def test_1000_concurrent_requests_all_answered_memory_bounded(cluster):
    deploy_simulated("load", delay_s=0.5)
    wait_healthy(cluster.base_url)
    try:
        asyncio.run(_fire(cluster.base_url, 100, 100, BODY))  # warm up
        before = ingress_rss_mb("load")
        started = time.monotonic()
        codes = asyncio.run(_fire(cluster.base_url, 1000, 1000, BODY))
        elapsed = time.monotonic() - started
        after = ingress_rss_mb("load")
        assert codes.count(200) == 1000, {c: codes.count(c) for c in set(codes)}
        assert after - before < 300, f"ingress grew {after - before:.0f} MiB"
        print(f"1000 concurrent: {elapsed:.1f} s, ingress RSS {before:.0f} -> {after:.0f} MiB")
    finally:
        serve.delete("load")


def _replica_actor_names(app: str, deployment: str) -> list[str]:
    prefix = f"SERVE_REPLICA::{app}#{deployment}#"
    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith(prefix)]  # fmt: skip


def test_killing_an_engine_replica_under_load_fails_no_request(cluster):
    deploy_simulated("fault", delay_s=0.2)
    wait_healthy(cluster.base_url)
    try:
        victims = _replica_actor_names("fault", "engine:sim")
        assert len(victims) == 2

        def kill_later() -> None:
            time.sleep(1.5)
            ray.kill(ray.get_actor(victims[0], namespace="serve"), no_restart=True)

        killer = threading.Thread(target=kill_later)
        killer.start()
        codes = asyncio.run(_fire(cluster.base_url, 300, 20, BODY))
        killer.join()
        assert codes.count(200) == 300, {c: codes.count(c) for c in set(codes)}
        assert victims[0] not in _replica_actor_names("fault", "engine:sim")
    finally:
        serve.delete("fault")


def test_redeploying_a_changed_config_under_load_loses_no_request(cluster):
    deploy_simulated("redeploy", delay_s=0.2)
    wait_healthy(cluster.base_url)
    try:

        def redeploy_later() -> None:
            time.sleep(1.5)  # new engine and ingress replicas: both deployments change
            deploy_simulated("redeploy", delay_s=0.1, timeout_s=120)

        updater = threading.Thread(target=redeploy_later)
        updater.start()
        resent: list[int] = []  # closed by HAProxy's reload before an answer, sent again
        codes = asyncio.run(_fire(cluster.base_url, 400, 20, BODY, resent))
        updater.join()
        assert codes.count(200) == 400, {c: codes.count(c) for c in set(codes)}
        assert len(resent) <= 40, len(resent)  # a reload's idle connections, not a pattern
    finally:
        serve.delete("redeploy")


def test_relayed_requests_scale_the_engine_deployment_up(cluster):
    """The engines' own ports are out of Serve's sight: their in-flight answers, reported as a
    custom metric, must still drive Serve's autoscaler (`app.engines.autoscaling`)."""
    model = {"name": "sim", "source": "org/sim"}
    model["autoscaling"] = {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 2}
    config = load_config({"models": [model]})
    fast = {"autoscaling_config": {"upscale_delay_s": 0, "look_back_period_s": 2}}
    app = simulated_stack(config, engine_options=fast, delay_s=2.0)
    serve.run(app, name="scale", route_prefix="/")
    wait_healthy(cluster.base_url)
    try:
        assert len(_replica_actor_names("scale", "engine:sim")) == 1
        codes = asyncio.run(_fire(cluster.base_url, 200, 20, BODY))  # 20 in flight for ~20 s
        assert codes.count(200) == 200, {c: codes.count(c) for c in set(codes)}
        running = serve.status().applications["scale"].deployments["engine:sim"].replica_states
        assert running.get("RUNNING", 0) == 2, running
    finally:
        serve.delete("scale")
