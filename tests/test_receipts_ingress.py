"""Route receipts at the ingress (in front of engine doubles): who gets them, and the checks of
their predictions against the engines' usage in /metrics and the logs."""

from __future__ import annotations

import json
import logging

import pytest
from prometheus_client.parser import text_string_to_metric_families

from app.engines.http_server import Usage
from app.observability.receipts import check_prediction
from tests.test_ingress import make_client
from tests.test_tenant_limits import _tenant, post, tenant_client

pytestmark = pytest.mark.anyio

PROMPT = {"model": "smollm2", "prompt": "x" * 400, "max_tokens": 4}  # 100 tokens, 6 blocks
ASK = {"x-route-receipt": "1"}


@pytest.fixture
def anyio_backend():
    return "asyncio"


async def test_a_request_that_asks_gets_its_receipt(cpu_model):
    async with make_client(cpu_model) as (client, _, _):
        plain = await client.post("/v1/completions", json=PROMPT)
        assert plain.status_code == 200 and "x-route-receipt" not in plain.headers
        asked = await client.post("/v1/completions", json=PROMPT, headers=ASK)
        assert asked.status_code == 200
    receipt = json.loads(asked.headers["x-route-receipt"])
    assert receipt["replica"] == asked.headers["x-route-replica"]
    assert receipt["reason"] == asked.headers["x-route-reason"]
    assert receipt["policy"] == "scored" and receipt["prompt_tokens"] == 100
    (candidate,) = receipt["candidates"]  # the double's one replica, where the first went
    assert candidate["replica"] == plain.headers["x-route-replica"]
    assert candidate["match"] == pytest.approx(96 / 100)  # 6 blocks of 16 of 100 tokens
    assert receipt["predicted_cached_tokens"] == 96
    assert set(candidate["terms"]) == {"prefix", "load", "queue", "kv", "pressure", "work"}
    assert candidate["score"] == pytest.approx(sum(candidate["terms"].values()))
    assert receipt["margin"] is None  # no runner-up


async def test_router_receipts_give_every_answer_one(cpu_model):
    config = {"models": [cpu_model], "router": {"receipts": True}}
    async with make_client(cpu_model, config=config) as (client, _, _):
        stream = await client.post("/v1/completions", json={**PROMPT, "stream": True})
        assert stream.status_code == 200
        assert json.loads(stream.headers["x-route-receipt"])["policy"] == "scored"


async def test_with_tenants_receipts_reach_the_logs_only(cpu_model, caplog):
    async with tenant_client(cpu_model, _tenant("a", "sk-a")) as (client, _, stack):
        response = await client.post(
            "/v1/completions", json=PROMPT, headers={**ASK, "authorization": "Bearer sk-a"}
        )
        assert response.status_code == 200 and "x-route-receipt" not in response.headers
        assert stack.routes["smollm2"].routed[-1].decision.receipt is None  # not even made
    tenants = {"auth": {"api_keys": [], "api_keys_env": None}, "tenants": [_tenant("a", "sk-a")]}
    config = {"models": [cpu_model], "router": {"receipts": True}, **tenants}
    caplog.set_level(logging.INFO, logger="vrstack.receipts")
    async with make_client(cpu_model, config=config) as (client, _, _):
        response = await post(client, "sk-a", PROMPT)
        assert response.status_code == 200
        assert set(response.headers) & {"x-route-receipt", "x-route-reason"} == set()
    (logged,) = [r for r in caplog.records if r.name == "vrstack.receipts"]
    receipt = json.loads(logged.getMessage().removeprefix("route receipt "))
    assert receipt["request_id"] == response.headers["x-request-id"]
    assert receipt["candidates"] and "predicted_cached_tokens" in receipt


def _route_tokens(text: str) -> dict[tuple[str, str], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "vrstack_route_cached_tokens_total":
                out[s.labels["policy"], s.labels["kind"]] = s.value
            if s.name == "vrstack_route_prediction_error_ratio_count":
                out[s.labels["policy"], "answers"] = s.value
    return out


async def test_predictions_are_checked_against_the_engines_cached_tokens(cpu_model):
    async with make_client(cpu_model) as (client, engines, _):
        engine = engines["smollm2"]
        engine.usage = {"prompt_tokens": 100, "completion_tokens": 4}  # no cached_tokens: unchecked
        assert (await client.post("/v1/completions", json=PROMPT)).status_code == 200
        engine.usage["prompt_tokens_details"] = {"cached_tokens": 64}  # type: ignore[assignment]
        again = await client.post("/v1/completions", json=PROMPT)
        assert again.status_code == 200
        figures = _route_tokens((await client.get("/metrics")).text)
    assert again.headers["x-route-reason"] == "prefix-match=0.96"
    predicted = 96
    assert figures["scored", "answers"] == 1
    assert figures["scored", "prompt"] == 100
    assert figures["scored", "predicted"] == predicted
    assert figures["scored", "realised"] == 64
    assert figures["scored", "overpredicted"] == predicted - 64
    assert figures["scored", "underpredicted"] == 0


def test_a_check_never_predicts_the_prompts_last_token():
    assert check_prediction(1.0, Usage(128, 1, 0)) == (128, 127, 0)
    assert check_prediction(0.5, Usage(128, 1, 64)).error_share == 0.0  # type: ignore[union-attr]
    assert check_prediction(None, Usage(128, 1, 64)) is None  # no prefix signal
    assert check_prediction(0.5, Usage(128, 1)) is None  # the engine did not say
