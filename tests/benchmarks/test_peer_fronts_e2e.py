"""The Ray Serve fronts of the HTTP routing benchmark (`benchmarks.ray_fronts`), end to end: the
real proxy, our Ingress and request router, and stock Ray Serve LLM's ingress with Ray's
`PrefixCacheAffinityRouter`, each in front of simulator fronts bound to HTTP simulators
(`benchmarks.sim_server`). Loopback only; a small trace, bounded in time."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import pytest

from app.lab.workloads import shared_prefix
from benchmarks.peer_bench import figures, replay, sim_stats, start_simulator, warm_up
from benchmarks.processes import free_ports, stop
from benchmarks.ray_fronts import RayFronts
from tests.conftest import Cluster

pytestmark = pytest.mark.e2e
REPLICAS = 3
# 4 groups of 4 prompts sharing a 400-token system prompt, at 10 req/s.
TRACE = shared_prefix(groups=4, prompts_per_group=4, system_prompt=400, question=20, qps=10.0)


@pytest.fixture(scope="module")
def workers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    ports = free_ports(REPLICAS)
    logs = tmp_path_factory.mktemp("sim")
    sim = start_simulator(ports, logs, time_scale=0.1, cache_blocks=2048, max_concurrency=32)
    try:
        yield [f"http://127.0.0.1:{p}" for p in ports]
    finally:
        stop(sim)


@pytest.mark.parametrize("router", ["ours-stack:scored", "ray:prefix_cache_affinity"])
def test_front_answers_reports_cache_and_uses_every_replica(
    cluster: Cluster, workers: list[str], router: str
) -> None:
    fronts = RayFronts(cluster.base_url)
    kind, policy = router.split(":")
    url = fronts.deploy(kind, policy, workers, cache_blocks=2048)
    try:
        assert sorted(fronts.bindings) == sorted(workers)
        assert len(set(fronts.bindings.values())) == REPLICAS
        # as the benchmark does: Serve builds the request router on the first request
        assert asyncio.run(warm_up(url, 2 * REPLICAS, "default", timeout=60)) == ""
        sim_stats(workers, reset=True, trace=TRACE)  # and the trace's arrival times
        outcomes = asyncio.run(replay(url, TRACE, scale=1.0, timeout=120))
        assert outcomes is not None, "replay did not finish"
        got = figures(outcomes, sim_stats(workers))
        assert got["ok"] == len(TRACE), got["first_error"]
        assert all(o.cached >= 0 and o.prompt > 0 for o in outcomes)  # usage passed through
        assert sum(o.cached for o in outcomes) > 0
        assert got["client_hit_rate"] == pytest.approx(got["hit_rate"])
        assert all(n > 0 for n in got["requests_per_replica"]), got["requests_per_replica"]
        assert sum(got["requests_per_replica"]) == len(TRACE)
        # every prompt reached a simulator unchanged: all found in the posted schedule
        assert got["unscheduled"] == 0 and got["modelled_ttft_p99_ms"] is not None
    finally:
        fronts.delete()


def test_front_non_streaming_chat_and_kept_front(cluster: Cluster, workers: list[str]) -> None:
    fronts = RayFronts(cluster.base_url)
    url = fronts.deploy("ray", "prefix_cache_affinity", workers, cache_blocks=2048, keep=True)
    try:
        body = {"model": "default", "prompt": "one two three four", "max_tokens": 3}
        reply = httpx.post(url + "/v1/completions", json=body, timeout=60)
        assert reply.status_code == 200, reply.text
        assert reply.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        chat = {"model": "default", "messages": [{"role": "user", "content": "hi"}], "stream": True}
        with httpx.stream("POST", url + "/v1/chat/completions", json=chat, timeout=60) as r:
            assert r.status_code == 200
            assert r.read().decode().rstrip().endswith("data: [DONE]")
        fronts.delete()  # kept: still serving, its prefix tree emptied on the next deploy
        assert fronts.deploy("ray", "prefix_cache_affinity", workers, 2048, keep=True) == url
        assert httpx.post(url + "/v1/completions", json=body, timeout=60).status_code == 200
    finally:
        fronts.clear()
    assert httpx.post(url + "/v1/completions", json=body, timeout=60).status_code == 404
