"""serve_configs/smollm2-cpu.yaml end to end: a real vLLM engine on the CPU under Ray Serve,
called with the `openai` client, plain HTTP (production-stack's curl paths) and the handle client;
and a real Prometheus scraping it (`tests/e2e/prometheus_panels.py`).
"""

from __future__ import annotations

import asyncio
import json
import os
import time

import httpx
import openai
import pytest

from app.client import StackClient, StackError
from app.engines.http_server import ENGINE_UNAVAILABLE
from tests.e2e.prometheus_panels import (  # run on this module's stack, first
    prometheus,  # noqa: F401
    test_every_dashboard_panel_has_data_in_prometheus,  # noqa: F401
)
from tests.e2e.test_reliability import replica_processes
from tests.engine_double import events

pytestmark = pytest.mark.e2e

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client(smollm2) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{smollm2.base_url}/v1", api_key="unused", max_retries=0)


def test_models_lists_model_and_aliases(client):
    ids = {m.id for m in client.models.list().data}
    assert ids == {"smollm2", "SmolLM2-135M-Instruct", "default"}


def test_chat_greedy_answer_mentions_paris(client):
    reply = client.chat.completions.create(
        model="smollm2", messages=FRANCE, temperature=0, max_tokens=24
    )
    assert "Paris" in reply.choices[0].message.content
    assert reply.usage.completion_tokens > 0 and reply.model == "smollm2"


def test_alias_reaches_the_same_model(client):
    reply = client.chat.completions.create(
        model="SmolLM2-135M-Instruct", messages=FRANCE, temperature=0, max_tokens=24
    )
    assert "Paris" in reply.choices[0].message.content


def test_streaming_chat_assembles_the_same_answer(client):
    stream = client.chat.completions.create(
        model="default", messages=FRANCE, temperature=0, max_tokens=24, stream=True
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert "Paris" in text


def test_completion_and_streaming_completion(client):
    reply = client.completions.create(
        model="smollm2", prompt="1, 2, 3,", max_tokens=6, temperature=0
    )
    assert reply.choices[0].text and reply.usage.completion_tokens <= 6
    chunks = list(
        client.completions.create(model="smollm2", prompt="1, 2, 3,", max_tokens=6, temperature=0,
                                  stream=True)
    )  # fmt: skip
    assert "".join(c.choices[0].text for c in chunks) == reply.choices[0].text


def test_production_stack_curl_paths(smollm2):
    base = smollm2.base_url
    models = httpx.get(f"{base}/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == "smollm2"
    body = {"model": "smollm2", "prompt": "Once upon a time,", "max_tokens": 10}
    response = httpx.post(f"{base}/completions", json=body, timeout=60)
    assert response.status_code == 200 and response.json()["object"] == "text_completion"
    raw = httpx.post(f"{base}/v1/completions", json={**body, "stream": True}, timeout=60)
    events = [line for line in raw.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]" and len(events) > 2
    assert response.headers["x-request-id"]


def test_tokenize_round_trip(smollm2):
    base = smollm2.base_url
    tokens = httpx.post(f"{base}/tokenize", json={"model": "smollm2", "prompt": "Hello world"})
    assert tokens.status_code == 200, tokens.text
    ids = tokens.json()["tokens"]
    text = httpx.post(f"{base}/detokenize", json={"model": "smollm2", "tokens": ids}).json()
    assert text["prompt"] == "Hello world"


def test_errors_are_openai_shaped(client, smollm2):
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-4o", messages=FRANCE)
    assert info.value.body["code"] == "model_not_found" and "smollm2" in info.value.body["message"]
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="smollm2", messages=FRANCE, temperature=7)
    assert info.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as info:  # checked by the engine: context length
        client.completions.create(model="smollm2", prompt="hello " * 3000, max_tokens=5)
    assert "context length" in info.value.body["message"]
    with pytest.raises(openai.BadRequestError) as info:  # this model cannot embed
        client.embeddings.create(model="smollm2", input="hi")
    raw = httpx.post(f"{smollm2.base_url}/v1/chat/completions", content=b"{not json",
                     headers={"content-type": "application/json"})  # fmt: skip
    assert raw.status_code == 400 and set(raw.json()["error"]) == {
        "message",
        "type",
        "param",
        "code",
    }
    assert httpx.get(f"{smollm2.base_url}/v1/nothing").status_code == 404


def test_health_and_version(smollm2):
    health = httpx.get(f"{smollm2.base_url}/health")
    assert health.status_code == 200
    assert health.json()["models"]["smollm2"] == {"ready": True, "running_replicas": 1}
    assert httpx.get(f"{smollm2.base_url}/version").json()["ray"] == "2.60.0"
    head = httpx.head(f"{smollm2.base_url}/health")  # a load balancer's check, through HAProxy
    assert head.status_code == 200 and head.content == b"" and head.headers.get("x-request-id")


def test_handle_client(smollm2):
    client = StackClient(smollm2.app_name)

    async def run() -> tuple[dict, list[dict], dict]:
        reply = await client.chat("default", FRANCE, temperature=0, max_tokens=24)
        chunks = [
            c async for c in client.stream_chat("smollm2", FRANCE, temperature=0, max_tokens=24)
        ]
        completion = await client.completions("smollm2", "1, 2, 3,", max_tokens=4, temperature=0)
        return reply, chunks, completion

    reply, chunks, completion = asyncio.run(run())
    assert "Paris" in reply["choices"][0]["message"]["content"]
    streamed = "".join(
        c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]
    )
    assert streamed == reply["choices"][0]["message"]["content"]
    assert completion["object"] == "text_completion"
    sync = client.completions_sync("smollm2", "1, 2, 3,", max_tokens=4, temperature=0)
    assert sync["choices"][0]["text"] == completion["choices"][0]["text"]
    with pytest.raises(StackError) as info:
        client.chat_sync("nope", FRANCE)
    assert info.value.status == 404 and info.value.code == "model_not_found"
    with pytest.raises(StackError) as info:
        client.chat_sync("smollm2", FRANCE, max_tokens=-1)
    assert info.value.status == 400 and info.value.param == "max_tokens"


def test_a_batch_runs_on_the_engine_with_the_openai_clients_batch_api(client):
    """Files and batches as OpenAI's clients use them: upload, create, poll, download."""
    lines = [
        {"custom_id": f"q{i}", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": "default", "messages": [{"role": "user", "content": question}],
                  "max_tokens": 24, "temperature": 0}}
        for i, question in enumerate(["What is the capital of France?", "Say hello."])
    ]  # fmt: skip
    data = "".join(json.dumps(line) + "\n" for line in lines).encode()
    upload = client.files.create(file=("questions.jsonl", data), purpose="batch")
    batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                                  completion_window="24h")  # fmt: skip
    deadline = time.monotonic() + 180
    while batch.status not in ("completed", "failed") and time.monotonic() < deadline:
        time.sleep(1)
        batch = client.batches.retrieve(batch.id)
    assert batch.status == "completed" and batch.request_counts.completed == 2, batch
    results = [json.loads(x) for x in client.files.content(batch.output_file_id).text.splitlines()]
    answers = {r["custom_id"]: r["response"] for r in results}
    assert sorted(answers) == ["q0", "q1"]
    assert all(answer["status_code"] == 200 for answer in answers.values())
    assert "Paris" in answers["q0"]["body"]["choices"][0]["message"]["content"]
    assert answers["q0"]["body"]["usage"]["completion_tokens"] <= 24


def test_the_engine_runs_its_cpus_threads_where_the_os_places_them(smollm2):
    """The vLLM worker runs `resources.cpu` threads (1 here), free to run on any core: vLLM's
    own binding pins every engine of a node to the same core (the first but one)."""
    (replica,) = replica_processes(smollm2.app_name, "engine:smollm2")
    workers = [c for c in replica.children(recursive=True) if "Worker" in c.name()]
    assert workers
    for worker in workers:
        assert set(worker.cpu_affinity()) == os.sched_getaffinity(0)
        assert worker.environ().get("OMP_NUM_THREADS") == "1"


# -- last: vLLM's engine core process killed inside the live replica ---------------------------
def test_a_real_engine_core_killed_mid_stream(smollm2):
    """The only replica's `VLLM::EngineCore` child killed mid-stream. The stream ends with
    `engine_unavailable` and [DONE], a new request is an OpenAI-shaped 503 (the only replica
    refuses, none is left to retry on), vLLM's text is never answered, and Serve's health check
    replaces the replica."""
    base = smollm2.base_url
    (replica,) = replica_processes(smollm2.app_name, "engine:smollm2")
    (core,) = [c for c in replica.children(recursive=True) if "EngineCore" in c.name()]
    body = {"model": "smollm2", "prompt": "Once upon a time,", "max_tokens": 300,
            "ignore_eos": True, "stream": True}  # fmt: skip
    with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=120) as response:
        chunks = response.iter_text()
        text = next(chunks)
        core.kill()
        text += "".join(chunks)
    *tokens, failure, done = events(text)
    assert response.status_code == 200 and tokens and done == "[DONE]"
    assert failure["error"]["code"] == ENGINE_UNAVAILABLE and "EngineCore" not in text
    again = httpx.post(f"{base}/v1/completions", json={**body, "stream": False}, timeout=60)
    assert again.status_code == 503 and again.json()["error"]["code"] == "replica_failed"
    assert "EngineCore" not in again.text and again.headers.get("x-request-id")

    def answered() -> bool:
        small = {**body, "stream": False, "max_tokens": 4}
        return httpx.post(f"{base}/v1/completions", json=small, timeout=60).status_code == 200

    started = time.monotonic()
    while not answered():
        assert time.monotonic() - started < 300, "no new replica answered within 300 s"
        time.sleep(0.25)
    took = time.monotonic() - started
    print(f"real engine core killed: stream ended in-band, 503 after; replaced in {took:.0f} s")
