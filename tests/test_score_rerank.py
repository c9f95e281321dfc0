"""/v1/score and /v1/rerank (and /score, /rerank) through the ingress, in front of engine doubles
on loopback ports: routing to the engine's scoring endpoints, validation errors in OpenAI's
shape, pooling-only models, and token charging by the input."""

from __future__ import annotations

import pytest

from app.config import load_config
from app.ingress.gateway import ENGINE_PATHS
from app.ingress.protocol import RerankRequest, ScoreRequest, approx_tokens
from tests.test_ingress import assert_openai_error, make_client

pytestmark = pytest.mark.anyio

RERANK = {"query": "capital of France", "documents": ["Paris is in France.", "Cats purr."]}
SCORE = {"text_1": "capital of France", "text_2": ["Paris is in France.", "Cats purr."]}


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture
def pooling(cpu_model) -> dict:
    """Models whose engine args say what they run: an embedding model, a generating one."""
    embed = {**cpu_model, "name": "embed", "aliases": ["emb"],
             "engine_args": {"runner": "pooling", "convert": "embed"}}  # fmt: skip
    chat = {**cpu_model, "name": "chat", "aliases": [], "engine_args": {"runner": "generate"}}
    return {"models": [embed, chat]}


@pytest.mark.parametrize(
    ("path", "endpoint", "body"),
    [
        ("/v1/score", "score", SCORE),
        ("/score", "score", SCORE),
        ("/v1/rerank", "rerank", RERANK),
        ("/rerank", "rerank", {**RERANK, "top_n": 1}),
    ],
)
async def test_scoring_paths_reach_the_engines_scoring_endpoint(
    cpu_model, pooling, path, endpoint, body
):
    async with make_client(cpu_model, config=pooling) as (client, engines, _):
        sent_body = {"model": "emb", **body, "truncate_prompt_tokens": 8}
        response = await client.post(path, json=sent_body)
        assert response.status_code == 200, response.text
        called, sent = engines["embed"].calls[-1]
        assert called == endpoint and sent["model"] == "embed"
        assert sent == {**body, "model": "embed", "truncate_prompt_tokens": 8}
        assert not engines["chat"].calls
    assert ENGINE_PATHS[endpoint] == f"/{endpoint}"  # vLLM's own paths on the engine's port


@pytest.mark.parametrize(
    "pair",
    [
        {"queries": "q", "documents": ["a", "b"]},
        {"queries": ["q1", "q2"], "items": ["a", "b"]},
        {"data_1": "q", "data_2": "a"},
        {"text_1": "q", "text_2": {"content": [{"type": "text", "text": "a"}]}},
    ],
)
async def test_score_takes_each_of_vllms_input_pairs(cpu_model, pooling, pair):
    async with make_client(cpu_model, config=pooling) as (client, engines, _):
        response = await client.post("/v1/score", json={"model": "embed", **pair})
        assert response.status_code == 200, response.text
        assert engines["embed"].calls[-1][1] == {"model": "embed", **pair}


@pytest.mark.parametrize(
    ("path", "body", "param", "words"),
    [
        ("/v1/score", {"text_1": "q"}, None, "give one pair of inputs"),
        ("/v1/score", {"queries": "q", "documents": "a", "items": "b"}, None, "one pair"),
        ("/v1/score", {"text_1": "q", "text_2": "a", "data_1": "x"}, None, "one pair"),
        ("/v1/score", {"text_1": ["a", "b"], "text_2": ["c", "d", "e"]}, None, "as many as"),
        ("/v1/score", {"text_1": "q", "text_2": []}, "text_2", "text_2"),
        ("/v1/score", {**SCORE, "truncate_prompt_tokens": -2}, "truncate_prompt_tokens", ""),
        ("/v1/rerank", {"query": "q"}, "documents", "missing"),
        ("/v1/rerank", {"documents": ["a"]}, "query", "missing"),
        ("/rerank", {**RERANK, "top_n": -1}, "top_n", "greater than or equal"),
        ("/rerank", {**RERANK, "query": ""}, "query", "at least 1"),
    ],
)
async def test_bad_scoring_requests_are_400_naming_the_parameter(
    cpu_model, pooling, path, body, param, words
):
    async with make_client(cpu_model, config=pooling) as (client, engines, _):
        response = await client.post(path, json={"model": "embed", **body})
        error = assert_openai_error(response, 400, param)
        assert words in error["message"] and error["type"] == "invalid_request_error"
        assert not engines["embed"].calls


@pytest.mark.parametrize("path", ["/v1/score", "/v1/rerank"])
async def test_a_generating_model_cannot_score(cpu_model, pooling, path):
    body = SCORE if "score" in path else RERANK
    async with make_client(cpu_model, config=pooling) as (client, engines, _):
        error = assert_openai_error(await client.post(path, json={"model": "chat", **body}), 400)
        assert error["param"] == "model" and error["code"] == "model_not_supported"
        assert "pooling model" in error["message"]
        assert not engines["chat"].calls


async def test_unknown_model_and_wrong_method(cpu_model, pooling):
    async with make_client(cpu_model, config=pooling) as (client, _, _):
        missing = await client.post("/v1/rerank", json={"model": "nope", **RERANK})
        assert assert_openai_error(missing, 404, "model")["code"] == "model_not_found"
        assert_openai_error(await client.get("/v1/score"), 405)
        assert_openai_error(await client.post("/v1/score", content=b"{"), 400)


def test_the_runner_comes_from_the_engine_args(cpu_model):
    def runner(engine_args: dict) -> str | None:
        spec = load_config({"models": [{**cpu_model, "engine_args": engine_args}]}).models[0]
        return spec.runner

    assert runner({"convert": "embed"}) == runner({"runner": "pooling"}) == "pooling"
    assert runner({"convert": "classify"}) == "pooling"
    assert runner({"runner": "generate"}) == "generate"
    assert runner({}) is runner({"runner": "auto"}) is None  # vLLM picks by architecture


def test_scoring_is_charged_by_its_input_only():
    rerank = RerankRequest(model="m", query="q" * 40, documents=["d" * 400, "e" * 80])
    assert rerank.estimated_tokens() == approx_tokens(["q" * 40, "d" * 400, "e" * 80]) == 133
    score = ScoreRequest(model="m", queries="q" * 40, documents="d" * 400)
    assert score.estimated_tokens() == 11 + 101


async def test_the_engines_usage_settles_the_charge(cpu_model, pooling):
    config = {**pooling, "limits": {"per_key": {"tokens_per_minute": 1000}}}
    async with make_client(cpu_model, config=config) as (client, engines, _):
        engines["embed"].usage = {"prompt_tokens": 21, "total_tokens": 21}
        for path, body in (("/v1/rerank", RERANK), ("/v1/score", SCORE)):
            assert (await client.post(path, json={"model": "embed", **body})).status_code == 200
        keys = (await client.get("/usage")).json()["tenants"][-1]
    assert (keys["requests"], keys["prompt_tokens"], keys["output_tokens"]) == (2, 42, 0)


def test_scoring_inputs_are_counted_with_the_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    from app.ingress.prompt_tokens import PromptCounter

    words = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    counter = PromptCounter(words)
    rerank = RerankRequest(model="m", query="capital of France", documents=["a b", "c d e"])
    assert counter.count(rerank) == 3 + 2 + 3
    assert counter.count(ScoreRequest(model="m", queries=["a", "b"], items=["c d", "e"])) == 5
    multimodal = ScoreRequest(model="m", text_1="a", text_2={"content": [{"type": "text"}]})
    assert counter.count(multimodal) is None  # estimated instead


# -- the engine replica's rerank (vLLM's scoring service, which Ray Serve LLM does not serve) --


class ScoringService:
    """Stands in for vLLM's `ServingScores`: answers a rerank as its JSON response, or raises."""

    def __init__(self, answer: dict | Exception) -> None:
        self.answer = answer
        self.requests: list = []

    async def __call__(self, request, raw_request=None):
        from fastapi.responses import JSONResponse

        self.requests.append(request)
        if isinstance(self.answer, Exception):
            raise self.answer
        return JSONResponse(self.answer)

    def create_error_response(self, exc: Exception):
        from vllm.entrypoints.serve.exception_handling.error_response import (
            create_error_response,
        )

        return create_error_response(exc)


async def _rerank_answer(service, body: dict) -> tuple[int, dict]:
    from app.engines.llm_server import _plain, _request_class, _reranked

    request = _request_class("rerank", body).model_validate(body)
    (item,) = [item async for item in _reranked(service, request)]
    return _plain(item)


async def test_rerank_asks_vllms_scoring_service():
    result = {"index": 1, "document": {"text": "Paris"}, "relevance_score": 0.9}
    answer = {"id": "r", "model": "embed", "usage": {"prompt_tokens": 5, "total_tokens": 5},
              "results": [result]}  # fmt: skip
    service = ScoringService(answer)
    status, body = await _rerank_answer(service, {"model": "embed", **RERANK, "top_n": 1})
    assert status == 200 and body["results"] == [
        {**result, "document": {"text": "Paris", "multi_modal": None}}
    ]
    assert body["usage"] == {"prompt_tokens": 5, "total_tokens": 5}
    assert service.requests[0].top_n == 1 and service.requests[0].query == RERANK["query"]


async def test_rerank_errors_are_openai_shaped():
    status, body = await _rerank_answer(
        None, {"model": "chat", **RERANK}
    )  # a model that cannot score
    assert status == 400 and "does not support the 'score' task" in body["error"]["message"]
    refused = ScoringService(ValueError("Input lengths must be either 1:1, 1:N or N:N"))
    status, body = await _rerank_answer(refused, {"model": "embed", **RERANK})
    assert status == 400 and body["error"]["message"].startswith("Input lengths")


def test_the_engine_parses_each_score_shape_as_vllm_does():
    from app.engines.llm_server import _request_class

    shapes = {
        "ScoreQueriesDocumentsRequest": {"queries": "q", "documents": ["a"]},
        "ScoreQueriesItemsRequest": {"queries": "q", "items": ["a"]},
        "ScoreDataRequest": {"data_1": "q", "data_2": "a"},
        "ScoreTextRequest": {"text_1": "q", "text_2": "a"},
    }
    for name, body in shapes.items():
        request = _request_class("score", body).model_validate({"model": "m", **body})
        assert type(request).__name__ == name and request.data_2 in (["a"], "a")
