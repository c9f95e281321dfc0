"""Tenants on a real vLLM CPU engine: smollm2-cpu.yaml with two tenants of different priority
(and a third of 1 token a minute, whose refusals tell what the ingress charges at admission).

The engine is started with `scheduling_policy: priority` (set by the config for tenants) and
every request reaches it with its tenant's `priority`, after waiting in the ingress's fair
admission queue (the engine takes 2 sequences at once here, so most of them wait). Then the
accounting is checked against the engine's own counts: the admission charge is the engine's
`usage.prompt_tokens` plus `max_tokens` once the ingress has the model's tokenizer, and a
tenant's token counts equal the engine's to the token for every kind of answer."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
import yaml

from app.client import StackClient
from app.ingress.protocol import approx_tokens
from tests.conftest import SERVE_CONFIGS, Cluster
from tests.e2e.conftest import Stack, undeploy, wait_healthy

pytestmark = pytest.mark.e2e
APP = "vrstack"
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
KEYS = {"chat": "sk-e2e-chat", "eval": "sk-e2e-eval", None: "sk-e2e-plain"}
TINY = "sk-e2e-tiny"  # a tenant of 1 token a minute: its refusals tell the admission charge


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
        {"name": "tiny", "api_keys": [TINY], "quotas": {"tokens_per_minute": 1}},
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


# -- accounting against the engine's own counts ---------------------------------------------
CJK = "日本語のテキストを数えます。東京は日本の首都です。"
CHAT = [
    {"role": "system", "content": "Answer in one word."},
    {"role": "user", "content": "東京はどこの首都ですか? 👍"},
]
MAX_TOKENS = 5
FETCH_S = 180  # the ingress fetches the tokenizer in the background after it starts
USAGE_TENANT = "chat"
TOKENS = 8


def _post(base: str, path: str, key: str, body: dict) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"}
    return httpx.post(f"{base}{path}", json=body, headers=headers, timeout=120)


def _charged(base: str, path: str, body: dict) -> int:
    """The tokens the ingress charges the request at admission (the tiny tenant's refusal)."""
    refused = _post(base, path, TINY, body)
    assert refused.status_code == 400, refused.text
    error = refused.json()["error"]
    assert error["code"] == "tokens_exceed_limit", error
    return int(re.search(r"needs about (\d+) tokens", error["message"])[1])


def _prompt_tokens(base: str, path: str, body: dict) -> int:
    answered = _post(base, path, KEYS[None], body)
    assert answered.status_code == 200, answered.text
    return answered.json()["usage"]["prompt_tokens"]


def test_the_admission_charge_is_the_engines_prompt_tokens_plus_max_tokens(tenant_stack):
    from ray import serve

    base = tenant_stack.base_url
    engine = serve.get_deployment_handle("engine:smollm2", tenant_stack.app_name)
    spec = engine.options(method_name="tokenizer_spec").remote().result(timeout_s=120)
    assert spec["tokenizer"].startswith("{") and "<|im_start|>" in spec["chat_template"]

    completion = {"model": "smollm2", "prompt": CJK, "max_tokens": MAX_TOKENS, "temperature": 0}
    prompt = _prompt_tokens(base, "/v1/completions", completion)
    assert prompt != approx_tokens(CJK)  # the estimate would be off: counting shows
    deadline = time.monotonic() + FETCH_S
    while (charged := _charged(base, "/v1/completions", completion)) != prompt + MAX_TOKENS:
        assert charged == approx_tokens(CJK) + MAX_TOKENS  # the estimate until then
        assert time.monotonic() < deadline, "the ingress did not fetch the tokenizer"
        time.sleep(1)

    chat = {"model": "smollm2", "messages": CHAT, "max_tokens": MAX_TOKENS, "temperature": 0}
    chat_prompt = _prompt_tokens(base, "/v1/chat/completions", chat)
    assert _charged(base, "/v1/chat/completions", chat) == chat_prompt + MAX_TOKENS
    listed = {**completion, "prompt": [CJK, "Once upon a time,"], "n": 2, "temperature": 1}
    listed_prompt = _prompt_tokens(base, "/v1/completions", listed)
    assert _charged(base, "/v1/completions", listed) == listed_prompt + MAX_TOKENS * 2 * 2
    print(f"charged at admission: completion {prompt}+{MAX_TOKENS}, chat {chat_prompt}+"
          f"{MAX_TOKENS} (estimate {approx_tokens(CJK)} for the completion's prompt)")  # fmt: skip


def _figures(base: str) -> dict[str, float]:
    """The tenant's token counts and the engine's totals in the ingress's `/metrics`."""
    text = httpx.get(f"{base}/metrics", timeout=30).text
    tenant = _samples(text, "vrstack_tenant_tokens_total")
    engine = {
        kind: sum(
            value
            for name, value in _samples(text, f"vrstack_{kind}_tokens_total").items()
            if 'model="smollm2"' in name
        )
        for kind in ("prompt", "output")
    }
    figures = {
        f"tenant_{kind}": tenant.get(
            f'vrstack_tenant_tokens_total{{kind="{kind}",tenant="{USAGE_TENANT}"}}', 0.0
        )
        for kind in ("prompt", "output", "estimated")
    }
    return {
        **figures,
        "engine_prompt": engine["prompt"],
        "engine_output": engine["output"],
    }


def _settled_figures(base: str, timeout_s: float = 30) -> dict[str, float]:
    """`_figures` once two reads a routing-stats period apart agree."""
    deadline = time.monotonic() + timeout_s
    figures = _figures(base)
    while time.monotonic() < deadline:
        time.sleep(3)  # the engine's totals come with its routing stats, every 2 s
        figures, previous = _figures(base), figures
        if figures == previous:
            break
    return figures


def _traffic(base: str) -> int:
    """The mix of requests; how many were sent."""
    client = openai.OpenAI(base_url=f"{base}/v1", api_key=KEYS[USAGE_TENANT], max_retries=0)
    common = {"model": "smollm2", "max_tokens": TOKENS, "temperature": 0}
    sent = 0
    reply = client.completions.create(prompt="Count to five:", **common)
    assert reply.usage.completion_tokens > 0
    reply = client.completions.create(prompt="Name a color:", n=2, **{**common, "temperature": 1})
    assert len(reply.choices) == 2
    reply = client.completions.create(prompt=["One plus one is", "The sky is"], **common)
    assert len(reply.choices) == 2
    reply = client.chat.completions.create(messages=FRANCE, **common)
    assert reply.usage.prompt_tokens > 0
    sent += 4
    for usage in (False, True):
        options = {"stream_options": {"include_usage": True}} if usage else {}
        chunks = list(client.completions.create(prompt="Say hi:", stream=True, **common, **options))
        assert (chunks[-1].usage is not None) is usage
        chunks = list(
            client.chat.completions.create(messages=FRANCE, stream=True, **common, **options)
        )
        assert (chunks[-1].usage is not None) is usage
        sent += 2
    chunks = list(
        client.completions.create(
            prompt=["Red, green,", "North, south,"], n=2, stream=True,
            **{**common, "temperature": 1},
        )
    )  # fmt: skip
    assert {c.choices[0].index for c in chunks if c.choices} == {0, 1, 2, 3}
    sent += 1
    # the raw bytes of a stream: the engine's usage comment never reaches the client
    body = {**common, "messages": FRANCE, "stream": True}
    headers = {"Authorization": f"Bearer {KEYS[USAGE_TENANT]}"}
    raw = httpx.post(f"{base}/v1/chat/completions", json=body, headers=headers, timeout=120)
    assert raw.status_code == 200 and raw.text.rstrip().endswith("data: [DONE]")
    assert "vrstack-usage" not in raw.text
    return sent + 1


def test_a_tenants_tokens_equal_the_engines(tenant_stack: Stack):
    base = tenant_stack.base_url
    before = _settled_figures(base)  # the engine's counts of the tests before are all in
    started = time.monotonic()
    sent = _traffic(base)
    deadline = time.monotonic() + 30  # the engine's totals come with its routing stats (2 s)
    while True:
        after = _figures(base)
        delta = {key: after[key] - before[key] for key in after}
        engine = (delta["engine_prompt"], delta["engine_output"])
        if engine == (delta["tenant_prompt"], delta["tenant_output"]):
            break
        if time.monotonic() > deadline:
            break
        time.sleep(1)
    print(f"{sent} requests in {time.monotonic() - started:.1f} s: {delta}")
    assert delta["tenant_prompt"] > 0 and delta["tenant_output"] > 0
    assert delta["tenant_prompt"] == delta["engine_prompt"], delta
    assert delta["tenant_output"] == delta["engine_output"], delta
    assert delta["tenant_estimated"] == 0, delta  # every answer told its usage
