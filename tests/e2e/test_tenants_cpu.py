"""Tenants on a real vLLM CPU engine: smollm2-cpu.yaml with two tenants of different priority.

The engine is started with `scheduling_policy: priority` (set by the config for tenants) and
every request reaches it with its tenant's `priority`, after waiting in the ingress's fair
admission queue (the engine takes 2 sequences at once here, so most of them wait)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
import yaml

from app.client import StackClient
from tests.conftest import SERVE_CONFIGS, Cluster
from tests.e2e.conftest import Stack, undeploy, wait_healthy

pytestmark = pytest.mark.e2e
APP = "vrstack"
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
KEYS = {"chat": "sk-e2e-chat", "eval": "sk-e2e-eval", None: "sk-e2e-plain"}


@pytest.fixture(scope="module")
def tenant_stack(cluster: Cluster) -> Iterator[Stack]:
    from ray import serve

    from app.builder import build_app

    (app,) = yaml.safe_load((SERVE_CONFIGS / "smollm2-cpu.yaml").read_text())["applications"]
    args = app["args"]
    args["models"][0]["engine_args"]["max_num_seqs"] = 2  # a queue forms at the ingress
    args["auth"] = {"api_keys": [KEYS[None]], "api_keys_env": None}
    args["tenants"] = [
        {"name": "chat", "api_keys": [KEYS["chat"]], "priority": "interactive", "weight": 2},
        {"name": "eval", "api_keys": [KEYS["eval"]], "priority": "batch"},
    ]
    serve.run(build_app(args), name=APP, route_prefix="/")
    wait_healthy(cluster.base_url)
    stack = Stack(cluster, APP)
    yield stack
    undeploy(stack)


def _samples(text: str, prefix: str) -> dict[str, float]:
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(prefix)
    }


async def _burst(base: str) -> list[tuple[str | None, int, dict]]:
    """4 batch, 2 interactive and 1 keyless-tenant completions at once."""
    async with httpx.AsyncClient(base_url=base, timeout=300) as client:

        async def one(tenant: str | None, i: int) -> tuple[str | None, int, dict]:
            body = {"model": "smollm2", "prompt": f"Count to {i}:", "max_tokens": 8}
            headers = {"Authorization": f"Bearer {KEYS[tenant]}"}
            response = await client.post("/v1/completions", json=body, headers=headers)
            return tenant, response.status_code, {**response.headers, "body": response.json()}

        who = ["eval"] * 4 + ["chat"] * 2 + [None]
        return await asyncio.gather(*(one(t, i) for i, t in enumerate(who)))


def test_two_tenants_of_different_priority_are_served_by_a_priority_engine(tenant_stack):
    from ray import serve

    base = tenant_stack.base_url
    engine = serve.get_deployment_handle("engine:smollm2", tenant_stack.app_name)
    running = engine.llm_config.remote().result(timeout_s=60)  # the replica's own config
    assert running.engine_kwargs["scheduling_policy"] == "priority"
    assert running.engine_kwargs["max_num_seqs"] == 2
    for tenant in ("chat", "eval"):  # each tenant's key, through the openai client
        client = openai.OpenAI(base_url=f"{base}/v1", api_key=KEYS[tenant], max_retries=0)
        reply = client.chat.completions.create(
            model="smollm2", messages=FRANCE, temperature=0, max_tokens=24
        )
        assert "Paris" in reply.choices[0].message.content, tenant
        assert reply.usage.prompt_tokens > 0 and reply.usage.completion_tokens > 0
    started = time.monotonic()
    answers = asyncio.run(_burst(base))
    elapsed = time.monotonic() - started
    assert [status for _, status, _ in answers] == [200] * 7, answers
    for _, _, answer in answers:
        assert answer["body"]["choices"][0]["text"]
        assert answer["body"]["usage"]["completion_tokens"] <= 8
        assert answer["x-route-policy"] == "scored" and "x-route-reason" not in answer
    handle = StackClient(tenant_stack.app_name)  # not queued; the `standard` priority
    reply = handle.chat_sync("smollm2", FRANCE, temperature=0, max_tokens=24)
    assert "Paris" in reply["choices"][0]["message"]["content"]
    missing = httpx.post(f"{base}/v1/completions", json={"model": "smollm2", "prompt": "x"})
    assert missing.status_code == 401
    text = httpx.get(f"{base}/metrics", timeout=30).text
    waited = _samples(text, "vrstack_tenant_queue_seconds_count")
    assert waited['vrstack_tenant_queue_seconds_count{tenant="chat"}'] == 3
    assert waited['vrstack_tenant_queue_seconds_count{tenant="eval"}'] == 5
    assert waited['vrstack_tenant_queue_seconds_count{tenant="anonymous"}'] == 1
    queued = _samples(text, "vrstack_tenant_queue_seconds_sum")
    assert queued['vrstack_tenant_queue_seconds_sum{tenant="eval"}'] > 0  # the queue formed
    refused = _samples(text, "vrstack_tenant_queue_rejections_total")
    assert set(refused.values()) == {0}
    served = _samples(text, "vrstack_tenant_requests_total")
    assert served['vrstack_tenant_requests_total{status="200",tenant="chat"}'] == 3
    assert served['vrstack_tenant_requests_total{status="200",tenant="eval"}'] == 5
    print(f"tenants on a priority-scheduling CPU engine: burst of 7 in {elapsed:.1f} s")
