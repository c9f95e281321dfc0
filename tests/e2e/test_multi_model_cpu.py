"""serve_configs/multi-model.yaml end to end: two real vLLM engines behind one URL; the chat
model with a tool parser (vLLM serves any `tool_choice` but "none" only with one), the
embedding model scoring and reranking."""

from __future__ import annotations

import json
import math

import httpx
import openai
import pytest

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def client(multi_model) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{multi_model.base_url}/v1", api_key="unused", max_retries=0)


def test_both_models_listed(client):
    ids = {m.id for m in client.models.list().data}
    assert ids == {"smollm2", "default", "smollm2-embed", "embeddings"}


def test_model_field_picks_the_engine(client):
    reply = client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "Say hi"}], max_tokens=8
    )
    assert reply.choices[0].message.content
    emb = client.embeddings.create(model="embeddings", input=["red apple", "green apple"])
    assert emb.model == "smollm2-embed" and len(emb.data) == 2
    first = emb.data[0].embedding
    assert len(first) > 100 and math.isclose(sum(x * x for x in first), 1.0, rel_tol=1e-3)


def test_wrong_task_for_a_model_is_400(client):
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model="smollm2-embed", messages=[{"role": "user", "content": "hi"}]
        )


# -- tool calling (the chat model) ------------------------------------------------------------

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "enum": ["Paris", "London"]}},
            "required": ["city"],
        },
    },
}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
NAMED = {"type": "function", "function": {"name": "get_weather"}}


def test_named_tool_choice_calls_the_tool_and_takes_its_result(client):
    reply = client.chat.completions.create(
        model="smollm2", messages=ASK, tools=[WEATHER], tool_choice=NAMED, max_tokens=60,
        temperature=0,
    )  # fmt: skip
    (call,) = reply.choices[0].message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id
    assert isinstance(json.loads(call.function.arguments), dict)
    follow_up = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature_c": 21}'},
    ]
    answer = client.chat.completions.create(
        model="smollm2", messages=follow_up, tools=[WEATHER], max_tokens=16, temperature=0,
        tool_choice="none",
    )  # fmt: skip
    assert answer.choices[0].message.content and answer.usage.prompt_tokens > 0


def test_required_tool_choice_streams_a_tool_call(client):
    stream = client.chat.completions.create(
        model="smollm2", messages=ASK, tools=[WEATHER], tool_choice="required", max_tokens=60,
        temperature=0, stream=True,
    )  # fmt: skip
    deltas = [
        call.function
        for chunk in stream
        for choice in chunk.choices
        for call in choice.delta.tool_calls or []
    ]
    assert {d.name for d in deltas if d.name} == {"get_weather"}
    arguments = "".join(d.arguments or "" for d in deltas)
    assert isinstance(json.loads(arguments), dict)


def test_auto_tool_choice_is_served_by_the_parser(client):
    reply = client.chat.completions.create(
        model="smollm2", messages=ASK, tools=[WEATHER], tool_choice="auto", max_tokens=8,
        temperature=0,
    )  # fmt: skip
    message = reply.choices[0].message  # the model's text: it writes no pythonic tool call
    assert message.content and not message.tool_calls


# -- score and rerank (the embedding model) ---------------------------------------------------

DOCS = ["Paris is the capital of France.", "Bananas are yellow.", "France's capital is Paris."]


@pytest.mark.parametrize("path", ["/v1/score", "/score"])
def test_score_pairs_with_the_embedding_model(multi_model, path):
    body = {"model": "embeddings", "text_1": "What is the capital of France?", "text_2": DOCS}
    answer = httpx.post(f"{multi_model.base_url}{path}", json=body, timeout=60)
    assert answer.status_code == 200, answer.text
    scored = answer.json()
    assert scored["model"] == "smollm2-embed" and scored["usage"]["prompt_tokens"] > 0
    assert [d["index"] for d in scored["data"]] == [0, 1, 2]
    assert all(-1.0 <= d["score"] <= 1.0 for d in scored["data"])


@pytest.mark.parametrize("path", ["/v1/rerank", "/rerank"])
def test_rerank_orders_documents(multi_model, path):
    body = {"model": "smollm2-embed", "query": "capital of France", "documents": DOCS, "top_n": 2}
    answer = httpx.post(f"{multi_model.base_url}{path}", json=body, timeout=60)
    assert answer.status_code == 200, answer.text
    results = answer.json()["results"]
    assert len(results) == 2
    assert results[0]["relevance_score"] >= results[1]["relevance_score"]
    assert all(r["document"]["text"] == DOCS[r["index"]] for r in results)


def test_scoring_a_generating_model_is_400(multi_model):
    for path, body in (
        ("/v1/score", {"text_1": "a", "text_2": "b"}),
        ("/v1/rerank", {"query": "a", "documents": ["b"]}),
    ):
        answer = httpx.post(f"{multi_model.base_url}{path}", json={"model": "smollm2", **body})
        assert answer.status_code == 400, answer.text
        error = answer.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and "score" in error["message"]
