"""Our request router under Ray Serve: two real CPU engine replicas of the embedded model.

Checks that every answer carries the routing decision, that a repeated long prefix sticks to
the replica that cached it, and that unrelated concurrent requests spread over both replicas.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from benchmarks.processes import engine_core
from tests.e2e.conftest import deploy_two_replicas, undeploy

pytestmark = pytest.mark.e2e

SYSTEM = "You are a meticulous assistant for a railway company. " * 12


@pytest.fixture(scope="module")
def two_replicas(cluster):
    stack = deploy_two_replicas(cluster, "routing", "scored")
    yield stack.base_url
    undeploy(stack)


def _complete(base: str, prompt: str) -> httpx.Response:
    body = {"model": "smollm2", "prompt": prompt, "max_tokens": 2, "temperature": 0}
    response = httpx.post(f"{base}/v1/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response


def test_health_counts_two_replicas(two_replicas):
    health = httpx.get(f"{two_replicas}/health").json()
    assert health["models"]["smollm2"]["running_replicas"] == 2


def test_decisions_are_in_headers_and_a_shared_prefix_sticks(two_replicas):
    first = _complete(two_replicas, SYSTEM + "Question 0: when does the first train leave?")
    assert first.headers["x-route-policy"] == "scored"
    home = first.headers["x-route-replica"]
    for i in range(1, 5):
        again = _complete(two_replicas, SYSTEM + f"Question {i}: how long is the trip?")
        assert again.headers["x-route-replica"] == home
        assert again.headers["x-route-reason"].startswith("prefix-match=")
        assert float(again.headers["x-route-reason"].split("=")[1]) > 0.5


def test_unrelated_concurrent_requests_use_both_replicas(two_replicas):
    prompts = [f"Topic {i}: " + ("lorem ipsum " * 5) + str(i * 7919) for i in range(8)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        replicas = {
            r.headers["x-route-replica"]
            for r in pool.map(lambda p: _complete(two_replicas, p), prompts)
        }
    assert len(replicas) == 2


def test_streams_carry_route_headers(two_replicas):
    body = {"model": "smollm2", "prompt": "Hello", "max_tokens": 3, "stream": True}
    with httpx.stream("POST", f"{two_replicas}/v1/completions", json=body, timeout=120) as response:
        assert response.status_code == 200
        assert response.headers["x-route-policy"] == "scored"
        assert response.headers["x-route-replica"]
        assert "data: [DONE]" in response.read().decode()


# -- last: an engine killed mid-stream (its replica is replaced after the module) ---------------
def test_a_stream_whose_engine_dies_goes_on_exactly_at_the_other_replica(two_replicas):
    """The serving replica's `VLLM::EngineCore` killed after 8 chunks of a greedy stream: the
    stream continues at the other replica, its text the uninterrupted run's
    (`app.ingress.migration`), with the openai client reading it."""
    import openai

    client = openai.OpenAI(base_url=f"{two_replicas}/v1", api_key="none", timeout=120)
    request = {"model": "smollm2", "prompt": "The history of the railway in Britain began",
               "max_tokens": 64, "temperature": 0, "extra_body": {"ignore_eos": True}}  # fmt: skip
    expected = "".join(c.choices[0].text for c in client.completions.create(**request, stream=True))
    raw = client.completions.with_streaming_response.create(**request, stream=True)
    with raw as response:
        core = engine_core("routing", "engine:smollm2", response.headers["x-route-replica"])
        text = ""
        for i, chunk in enumerate(response.parse()):
            text += chunk.choices[0].text if chunk.choices else ""
            if i == 7:
                core.kill()
    assert text == expected and len(expected) > 100
    metrics = httpx.get(f"{two_replicas}/metrics", timeout=10).text
    assert 'vrstack_stream_migrations_total{model="smollm2",outcome="continued"} 1.0' in metrics
    print(
        f"engine killed after 8 chunks: the stream went on, {len(text)} characters as uninterrupted"
    )
