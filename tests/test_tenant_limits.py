"""Tenants at the ingress (in-process, in front of engine doubles): their models, output
bounds, shared quotas, token accounting, routing headers and metrics."""

from __future__ import annotations

import contextlib

import pytest

from app.config import KeyLimits, TenantQuotas
from app.errors import OpenAIError
from app.ingress.limits import DAY_S, KeyLimiter
from app.ingress.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    EmbeddingRequest,
    TokenizeRequest,
)
from tests.test_auth_limits import bearer
from tests.test_ingress import assert_openai_error, make_client

pytestmark = pytest.mark.anyio
BODY = {"model": "smollm2", "prompt": "hello", "max_tokens": 4}
CHAT = {"model": "smollm2", "messages": [{"role": "user", "content": "hi"}]}
USAGE = {"prompt_tokens": 2, "total_tokens": 5, "completion_tokens": 3}


@pytest.fixture
def anyio_backend():
    return "asyncio"


@contextlib.asynccontextmanager
async def tenant_client(cpu_model, *tenants, per_key=None, limits=None, mode="ok", auth=None):
    other = {**cpu_model, "name": "second", "aliases": ["b"]}
    config = {
        "models": [cpu_model, other],
        "auth": auth or {"api_keys": ["sk-plain"], "api_keys_env": None},
        "limits": {**(limits or {}), "per_key": per_key or {}},
        "tenants": list(tenants),
    }
    async with make_client(cpu_model, modes={"smollm2": mode}, config=config) as (client, e, s):
        yield client, e, s


def _tenant(name, *keys, **fields):
    return {"name": name, "api_keys": list(keys), **fields}


async def post(client, key, body, path="/v1/completions"):
    return await client.post(path, json=body, headers=bearer(key))


# -- models ---------------------------------------------------------------------------------


async def test_a_tenant_sees_and_uses_only_its_models(cpu_model):
    tenant = _tenant("a", "sk-a", models=["default"])  # an alias allows its model
    async with tenant_client(cpu_model, tenant) as (client, engines, _):
        assert (await post(client, "sk-a", BODY)).status_code == 200
        assert (await post(client, "sk-a", {**BODY, "model": "default"})).status_code == 200
        refused = await post(client, "sk-a", {**BODY, "model": "b"})
        error = assert_openai_error(refused, 404, "model")
        assert error["code"] == "model_not_found" and "do not have access" in error["message"]
        assert "second" not in error["message"] and "smollm2" in error["message"]
        missing = assert_openai_error(await post(client, "sk-a", {**BODY, "model": "gpt-4"}), 404)
        assert missing["message"].replace("gpt-4", "b") == error["message"]  # same answer
        assert not engines["second"].calls
        listed = await client.get("/v1/models", headers=bearer("sk-a"))
        assert [m["id"] for m in listed.json()["data"]] == ["smollm2", "default"]
        assert_openai_error(await client.get("/v1/models/second", headers=bearer("sk-a")), 404)
        everything = await client.get("/v1/models", headers=bearer("sk-plain"))
        assert len(everything.json()["data"]) == 4
        assert (await post(client, "sk-plain", {**BODY, "model": "b"})).status_code == 200


# -- output bounds --------------------------------------------------------------------------


async def test_a_tenants_default_output_is_set_and_its_maximum_enforced(cpu_model):
    tenant = _tenant("a", "sk-a", default_max_tokens=32, max_tokens=64)
    capped = _tenant("c", "sk-c", max_tokens=48)
    async with tenant_client(cpu_model, tenant, capped) as (client, engines, _):
        assert (await post(client, "sk-a", CHAT, "/v1/chat/completions")).status_code == 200
        assert engines["smollm2"].calls[-1][1]["max_tokens"] == 32
        assert (await post(client, "sk-c", {**BODY, "max_tokens": None})).status_code == 200
        assert engines["smollm2"].calls[-1][1]["max_tokens"] == 48
        assert (await post(client, "sk-a", {**BODY, "max_tokens": 64})).status_code == 200
        calls = len(engines["smollm2"].calls)
        over = await post(client, "sk-a", {**BODY, "max_tokens": 65})
        assert "limit of 64" in assert_openai_error(over, 400, "max_tokens")["message"]
        chat = {**CHAT, "max_completion_tokens": 100}
        over = await post(client, "sk-a", chat, "/v1/chat/completions")
        assert_openai_error(over, 400, "max_completion_tokens")
        assert len(engines["smollm2"].calls) == calls
        assert (await post(client, "sk-plain", CHAT, "/v1/chat/completions")).status_code == 200
        assert (
            "max_tokens" not in engines["smollm2"].calls[-1][1]
        )  # keys without a tenant: as before


# -- quotas ---------------------------------------------------------------------------------


async def test_a_tenants_quota_is_shared_by_its_keys_and_apart_from_other_keys(cpu_model):
    quotas = {"requests_per_second": 0.01, "burst": 2}
    tenant = _tenant("a", "sk-a1", "sk-a2", quotas=quotas)
    per_key = {"requests_per_second": 0.01, "burst": 1}
    async with tenant_client(cpu_model, tenant, per_key=per_key) as (client, _, _):
        assert (await post(client, "sk-a1", BODY)).status_code == 200
        assert (await post(client, "sk-a2", BODY)).status_code == 200
        limited = await post(client, "sk-a1", BODY)
        error = assert_openai_error(limited, 429)
        assert error["code"] == "rate_limit_exceeded" and "tenant 'a'" in error["message"]
        assert int(limited.headers["retry-after"]) >= 1
        assert (await post(client, "sk-plain", BODY)).status_code == 200  # limits.per_key
        assert_openai_error(await post(client, "sk-plain", BODY), 429)


async def test_a_refused_request_is_not_charged(cpu_model):
    tenant = _tenant("a", "sk-a", quotas={"requests_per_second": 0.01, "burst": 1}, max_tokens=8)
    async with tenant_client(cpu_model, tenant, limits={"max_n": 2}) as (client, _, _):
        assert_openai_error(await post(client, "sk-a", {**BODY, "n": 3}), 400, "n")
        assert_openai_error(await post(client, "sk-a", {**BODY, "max_tokens": 9}), 400)
        assert_openai_error(await post(client, "sk-a", {**BODY, "model": "nope"}), 404)
        assert_openai_error(await post(client, "sk-a", {**BODY, "temperature": 9}), 400)
        assert (await post(client, "sk-a", BODY)).status_code == 200
        assert_openai_error(await post(client, "sk-a", BODY), 429)


async def test_tokens_are_settled_from_the_answers_usage(cpu_model):
    tenant = _tenant("a", "sk-a", quotas={"tokens_per_minute": 200})
    async with tenant_client(cpu_model, tenant) as (client, engines, _):
        engines["smollm2"].usage = USAGE  # 5 tokens used of the 92 reserved
        big = {**BODY, "max_tokens": 90}
        for _ in range(5):
            assert (await post(client, "sk-a", big)).status_code == 200
        engines["smollm2"].usage = None  # no usage from the engine: the reservation holds
        assert (await post(client, "sk-a", big)).status_code == 200
        limited = await post(client, "sk-a", big)
        assert "200 tokens per minute" in assert_openai_error(limited, 429)["message"]


async def test_a_stream_is_settled_from_its_usage_else_keeps_its_reservation(cpu_model):
    tenant = _tenant("a", "sk-a", quotas={"tokens_per_minute": 100})
    async with tenant_client(cpu_model, tenant) as (client, engines, _):
        engines["smollm2"].usage = USAGE  # 5 tokens used of the 92 reserved
        streamed = await post(client, "sk-a", {**BODY, "max_tokens": 90, "stream": True})
        assert streamed.text.rstrip().endswith("data: [DONE]")
        assert "vrstack-usage" not in streamed.text
        engines["smollm2"].usage = None  # a stream without usage: the reservation holds
        streamed = await post(client, "sk-a", {**BODY, "max_tokens": 90, "stream": True})
        assert streamed.text.rstrip().endswith("data: [DONE]")
        assert_openai_error(await post(client, "sk-a", {**BODY, "max_tokens": 90}), 429)


async def test_an_engines_refusal_gives_the_tokens_back(cpu_model):
    tenant = _tenant("a", "sk-a", quotas={"tokens_per_minute": 100})
    async with tenant_client(cpu_model, tenant, mode="error400") as (client, _, _):
        for _ in range(3):
            assert_openai_error(await post(client, "sk-a", {**BODY, "max_tokens": 90}), 400)


async def test_prompt_lists_and_n_multiply_the_reservation(cpu_model):
    tenant = _tenant("a", "sk-a", quotas={"tokens_per_minute": 60})
    async with tenant_client(cpu_model, tenant) as (client, _, _):
        prompts = {**BODY, "prompt": ["a"] * 32, "max_tokens": 1}  # 32 prompts + 32 outputs
        error = assert_openai_error(await post(client, "sk-a", prompts), 400, "max_tokens")
        assert error["code"] == "tokens_exceed_limit" and "about 64 tokens" in error["message"]
        many = await post(client, "sk-a", {**BODY, "n": 4, "max_tokens": 15})  # 2 + 60
        assert "about 62 tokens" in assert_openai_error(many, 400)["message"]
        assert (await post(client, "sk-a", {**BODY, "n": 3, "max_tokens": 15})).status_code == 200


async def test_embeddings_are_charged_by_their_input(cpu_model):
    tenant = _tenant("a", "sk-a", quotas={"tokens_per_minute": 50})
    async with tenant_client(cpu_model, tenant) as (client, _, _):
        body = {"model": "smollm2", "input": ["x" * 160, "y" * 40]}  # 41 + 11
        refused = await post(client, "sk-a", body, "/v1/embeddings")
        assert "about 52 tokens" in assert_openai_error(refused, 400)["message"]


def test_token_estimates():
    def completion(**fields):
        return CompletionRequest.model_validate({"model": "m", **fields})

    assert completion(prompt="abcdefgh", max_tokens=10).estimated_tokens() == 3 + 10
    assert completion(prompt="日本語のテキスト", max_tokens=1).estimated_tokens() == 8 + 1 + 1
    assert completion(prompt="ok 👍👍", max_tokens=1).estimated_tokens() == 0 + 2 + 1 + 1
    assert completion(prompt=["ab", "cd"], n=2, max_tokens=5).estimated_tokens() == 2 + 5 * 4
    assert completion(prompt=[1, 2, 3], max_tokens=5).estimated_tokens() == 3 + 5  # one prompt
    assert completion(prompt=[[1, 2], [3]], max_tokens=5).estimated_tokens() == 3 + 5 * 2
    assert completion(prompt="x", n=2, best_of=3, max_tokens=5).estimated_tokens() == 1 + 15
    chat = ChatCompletionRequest.model_validate({**CHAT, "max_completion_tokens": 7})
    assert chat.estimated_tokens() == 1 + 7
    assert EmbeddingRequest(model="m", input="x" * 400).estimated_tokens() == 101
    assert TokenizeRequest(model="m", prompt="x" * 40).estimated_tokens() == 11
    assert DetokenizeRequest(model="m", tokens=list(range(30))).estimated_tokens() == 30
    assert DetokenizeRequest(model="m", tokens=[]).estimated_tokens() == 1


# -- the limiter ----------------------------------------------------------------------------


def test_daily_tokens_reset_at_utc_midnight():
    now, wall = [0.0], [10 * DAY_S + 3600.0]
    limiter = KeyLimiter(
        KeyLimits(),
        clock=lambda: now[0],
        tenants={"a": TenantQuotas(tokens_per_day=100)},
        wall=lambda: wall[0],
    )
    limiter.acquire("k", 60, "a").release()
    with pytest.raises(OpenAIError) as limited:
        limiter.acquire("k", 60, "a")
    assert limited.value.status == 429 and "100 tokens per day" in limited.value.message
    assert limited.value.headers["retry-after"] == str(DAY_S - 3600)
    with pytest.raises(OpenAIError, match="more than the limit of 100 tokens per day"):
        limiter.acquire("k", 101, "a")
    lease = limiter.acquire("k", 40, "a")
    lease.settle(10)  # 30 back
    lease.release()
    limiter.acquire("k", 30, "a").release()
    wall[0] = 11 * DAY_S
    limiter.acquire("k", 100, "a").release()


def test_settling_takes_more_when_more_was_used():
    now = [0.0]
    limiter = KeyLimiter(KeyLimits(tokens_per_minute=60), clock=lambda: now[0])
    lease = limiter.acquire("k", 10)
    lease.settle(50)  # the estimate was low: the bucket pays the difference
    lease.settle(0)  # settled once
    with pytest.raises(OpenAIError, match="tokens per minute"):
        limiter.acquire("k", 11)
    limiter.acquire("k", 10).release()


def test_concurrency_is_per_tenant():
    limiter = KeyLimiter(KeyLimits(), tenants={"a": TenantQuotas(max_concurrent=1)})
    held = limiter.acquire("k1", 1, "a")
    with pytest.raises(OpenAIError, match="more than 1 concurrent requests for tenant 'a'"):
        limiter.acquire("k2", 1, "a")
    limiter.acquire("k3", 1).release()  # a key without a tenant
    held.release()
    limiter.acquire("k2", 1, "a").release()


# -- routing headers ------------------------------------------------------------------------


async def test_a_tenant_cannot_learn_that_another_sent_a_prefix(cpu_model):
    prompt = {**BODY, "prompt": "x" * 400}  # 6 blocks: a prefix match when seen again
    fresh = {**BODY, "prompt": "y" * 400}
    async with make_client(cpu_model) as (client, _, _):  # without tenants: the oracle
        await client.post("/v1/completions", json=prompt)
        seen = await client.post("/v1/completions", json=prompt)
        assert seen.headers["x-route-reason"].startswith("prefix-match=")
    tenants = (_tenant("a", "sk-a"), _tenant("b", "sk-b"))
    async with tenant_client(cpu_model, *tenants) as (client, _, stack):
        assert (await post(client, "sk-a", prompt)).status_code == 200
        shown = []
        for key, body in (("sk-b", prompt), ("sk-b", fresh), ("sk-plain", prompt)):
            response = await post(client, key, body)
            assert response.status_code == 200
            shown.append({k: v for k, v in response.headers.items() if k.startswith("x-route")})
        assert shown == [{"x-route-policy": "scored"}] * 3
        decisions = [routed.decision.reason for routed in stack.routes["smollm2"].routed]
        assert decisions[1].startswith("prefix-match=")  # the router did match; nobody is told


# -- metrics --------------------------------------------------------------------------------


async def test_tenant_metrics(cpu_model):
    tenant = _tenant("a", "sk-a", quotas={"requests_per_second": 0.01, "burst": 2})
    async with tenant_client(cpu_model, tenant, _tenant("idle", "sk-i")) as (client, engines, _):
        engines["smollm2"].usage = USAGE
        assert (await post(client, "sk-a", BODY)).status_code == 200
        assert (await post(client, "sk-a", {**BODY, "stream": True})).status_code == 200
        assert_openai_error(await post(client, "sk-a", BODY), 429)
        assert (await post(client, "sk-plain", BODY)).status_code == 200
        text = (await client.get("/metrics")).text
    samples = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
               for line in text.splitlines() if line.startswith("vrstack_tenant_")}  # fmt: skip
    assert samples['vrstack_tenant_requests_total{status="200",tenant="a"}'] == 2
    assert samples['vrstack_tenant_requests_total{status="429",tenant="a"}'] == 1
    assert samples['vrstack_tenant_requests_total{status="200",tenant="anonymous"}'] == 1
    assert samples['vrstack_tenant_requests_total{status="200",tenant="idle"}'] == 0
    assert samples['vrstack_tenant_tokens_total{kind="prompt",tenant="a"}'] == 2 + 2  # + stream
    assert samples['vrstack_tenant_tokens_total{kind="output",tenant="a"}'] == 3 + 3
    assert samples.get('vrstack_tenant_tokens_total{kind="estimated",tenant="a"}', 0) == 0
    assert samples['vrstack_tenant_rejections_total{quota="requests_per_second",tenant="a"}'] == 1
    assert samples['vrstack_tenant_rejections_total{quota="tokens_per_day",tenant="idle"}'] == 0
    tenants = {line.split('tenant="')[1].split('"')[0] for line in samples}
    assert tenants == {"a", "idle", "anonymous"}  # bounded: names from the config only


# -- shared quotas on the HTTP path -----------------------------------------------------------


async def test_a_short_slice_waits_for_the_ledger_instead_of_refusing(cpu_model):
    """Another replica took most of the tenant's budget and gave it back: this replica holds
    too little for the request, the ledger has enough; the request is admitted over HTTP."""
    from app.tenants.ledger import Ledger, LocalLedger

    tenant = _tenant("a", "sk-a", quotas={"tokens_per_minute": 600})
    async with tenant_client(cpu_model, tenant) as (client, _, _):
        here = client._transport.app.gateway.limiter  # the app under test, as built
        ledger = Ledger()
        here.share(LocalLedger(ledger), "here")
        other = KeyLimiter(KeyLimits(), tenants={"a": TenantQuotas(tokens_per_minute=600)})
        other.share(LocalLedger(ledger), "other")
        await other.ready("k", 500, "a")
        other.acquire("k", 500, "a").settle(0)  # taken, then given back in full
        await other.sync(close=True)
        assert (await post(client, "sk-a", {**BODY, "max_tokens": 300})).status_code == 200
