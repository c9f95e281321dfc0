"""Mid-stream migration (`app.ingress.migration`), in-process: the ingress in front of engine
doubles that stream as vLLM does with `return_token_ids`, from a deterministic greedy model
(`benchmarks.toy_model`), one of two replicas failing mid-stream."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator

import openai
import pytest

from app.engines.http_server import ENGINE_UNAVAILABLE, Usage
from app.ingress.migration import MIGRATED_COMMENT, Stream, migratable
from app.ingress.protocol import ChatCompletionRequest, CompletionRequest
from benchmarks.toy_model import next_token, prompt_ids, word
from tests.engine_double import events
from tests.test_ingress import make_client
from tests.test_metrics import scrape, value

pytestmark = pytest.mark.anyio
BODY = {"model": "smollm2", "prompt": "Once upon a time", "max_tokens": 8, "stream": True}
CHAT = {"model": "smollm2", "messages": [{"role": "user", "content": "Say hi"}],
        "max_tokens": 8, "stream": True}  # fmt: skip
MODEL = {"model": True, "tokens": 8, "fail_at": 3}  # the doubles: 8 tokens, failing at the 4th


@pytest.fixture
def anyio_backend():
    return "asyncio"


def stack(cpu_model, mode: str = "engine_dies_once", **options):
    config = {"models": [cpu_model], "server": {"request_timeout_s": 5, **options}}
    return make_client(cpu_model, modes={"smollm2": mode}, config=config, double=MODEL)


def text_of(chunks: list) -> str:
    return "".join(
        c["choices"][0].get("text") or c["choices"][0].get("delta", {}).get("content") or ""
        for c in chunks
        if isinstance(c, dict) and c.get("choices")
    )


async def uninterrupted(cpu_model, body: dict) -> list:
    async with stack(cpu_model, mode="ok") as (client, _, _):
        response = await client.post(ENDPOINTS[_kind(body)], json=body)
        assert response.status_code == 200
        return events(response.text)


ENDPOINTS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}


def _kind(body: dict) -> str:
    return "chat" if "messages" in body else "completions"


@pytest.mark.parametrize("body", [BODY, CHAT], ids=["completions", "chat"])
async def test_a_stream_whose_engine_dies_continues_exactly_on_another_replica(cpu_model, body):
    expected = await uninterrupted(cpu_model, body)
    async with stack(cpu_model) as (client, engines, _):
        response = await client.post(ENDPOINTS[_kind(body)], json=body)
        samples = await scrape(client)
    assert response.status_code == 200
    assert response.headers["x-route-replica"] == "smollm2-r1"  # where it started
    got = events(response.text)
    assert text_of(got) == text_of(expected) and len(text_of(got).split()) == 8
    assert got[-1] == "[DONE]" and not [e for e in got if isinstance(e, dict) and "error" in e]
    chunks = [e for e in got if isinstance(e, dict)]
    assert {c["id"] for c in chunks} == {chunks[0]["id"]}  # one stream to the client
    assert {c["object"] for c in chunks} == {expected[0]["object"]}
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all(c["choices"][0].get("token_ids") is None for c in chunks)  # not asked for
    # The continuation: the prompt's ids and the 3 tokens sent, for the 5 tokens left.
    ((endpoint, continued),) = engines["smollm2"].calls
    sent = [next_token(prompt_ids(body))]
    while len(sent) < 3:
        sent.append(next_token(prompt_ids(body) + sent))
    assert endpoint == "completions"
    assert continued["prompt"] == prompt_ids(body) + sent and continued["max_tokens"] == 5
    note = f"{MIGRATED_COMMENT.decode()} 1 smollm2-r1,smollm2-r2 8"
    assert note in response.text.splitlines()
    assert value(samples, "vrstack_stream_migrations_total", outcome="continued") == 1
    assert value(samples, "vrstack_stream_migrations_total", outcome="failed") == 0


async def test_the_openai_client_reads_a_migrated_chat_with_its_usage(cpu_model):
    body = {**CHAT, "stream_options": {"include_usage": True}}
    expected = text_of(await uninterrupted(cpu_model, body))
    async with stack(cpu_model) as (client, _, _):
        oai = openai.AsyncOpenAI(base_url="http://stack/v1", api_key="none", http_client=client)
        stream = await oai.chat.completions.create(
            model="smollm2", messages=CHAT["messages"], max_tokens=8, stream=True,
            stream_options={"include_usage": True},
        )  # fmt: skip
        parts = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in parts if c.choices)
    assert text == expected
    usage = parts[-1].usage
    assert usage is not None and not parts[-1].choices
    assert (usage.prompt_tokens, usage.completion_tokens) == (len(prompt_ids(CHAT)), 8)


async def test_token_ids_asked_for_come_whole_across_the_break(cpu_model):
    body = {**BODY, "return_token_ids": True}
    expected = await uninterrupted(cpu_model, body)
    async with stack(cpu_model) as (client, _, _):
        response = await client.post("/v1/completions", json=body)

    def ids(chunks: list) -> list[int]:
        return [t for c in chunks if isinstance(c, dict) for t in c["choices"][0]["token_ids"]]

    got = events(response.text)
    assert ids(got) == ids(expected) and len(ids(got)) == 8
    assert got[0]["choices"][0]["prompt_token_ids"] == prompt_ids(BODY)


async def test_a_stream_that_drops_its_connection_continues(cpu_model):
    """The first replica's connection drops after two chunks (as a killed process's does)."""
    expected = text_of(await uninterrupted(cpu_model, BODY))
    async with dropping_engine(BODY, chunks=2) as url, stack(cpu_model) as (client, _, stack_):
        stack_.routes["smollm2"].replicas[0].replica_metadata["url"] = url
        response = await client.post("/v1/completions", json=BODY)
    assert response.status_code == 200
    assert text_of(events(response.text)) == expected
    assert f"{MIGRATED_COMMENT.decode()} 1 smollm2-r1,smollm2-r2 8" in response.text


async def test_a_stream_that_drops_before_its_first_chunk_starts_again(cpu_model):
    """The first replica answers the stream's head, then drops the connection: nothing reached
    the client, so the request is sent again whole to the other replica."""
    expected = text_of(await uninterrupted(cpu_model, CHAT))
    async with dropping_engine(CHAT, chunks=0) as url, stack(cpu_model) as (client, engines, s):
        s.routes["smollm2"].replicas[0].replica_metadata["url"] = url
        response = await client.post("/v1/chat/completions", json=CHAT)
        samples = await scrape(client)
    assert response.status_code == 200 and text_of(events(response.text)) == expected
    ((endpoint, again),) = engines["smollm2"].calls
    assert endpoint == "chat" and again["messages"] == CHAT["messages"]
    assert MIGRATED_COMMENT.decode() not in response.text  # one answer, from one replica
    assert value(samples, "vrstack_stream_migrations_total", outcome="continued") == 1


@contextlib.asynccontextmanager
async def dropping_engine(body: dict, chunks: int) -> AsyncIterator[str]:
    """An engine port that answers a stream's head and `chunks` chunks of the double's model,
    then closes the connection."""
    prompt, sequence = prompt_ids(body), prompt_ids(body)

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                     b"transfer-encoding: chunked\r\n\r\n")  # fmt: skip
        for i in range(chunks):
            token = next_token(sequence)
            sequence.append(token)
            choice = {"index": 0, "text": word(token), "finish_reason": None, "token_ids": [token],
                      "prompt_token_ids": prompt if i == 0 else None}  # fmt: skip
            chunk = {"id": "x", "object": "text_completion", "created": 1, "model": "smollm2",
                     "choices": [choice]}  # fmt: skip
            data = b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"
            writer.write(b"%x\r\n%s\r\n" % (len(data), data))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.close()


async def test_without_another_replica_the_stream_ends_with_the_engines_error(cpu_model):
    async with stack(cpu_model, mode="engine_dies") as (client, engines, _):
        response = await client.post("/v1/completions", json=BODY)
        samples = await scrape(client)
    *chunks, failure, done = events(response.text)
    assert len(chunks) == 3 and done == "[DONE]"
    assert failure["error"]["code"] == ENGINE_UNAVAILABLE
    assert len(engines["smollm2"].calls) == 1  # no replica to go on at
    assert value(samples, "vrstack_stream_migrations_total", outcome="failed") == 1


@pytest.mark.parametrize(
    ("options", "body"),
    [({}, {**BODY, "n": 2}), ({"migrate_streams": False}, BODY)],
    ids=["n=2", "turned-off"],
)
async def test_streams_not_migrated_end_with_an_error_event(cpu_model, options, body):
    async with stack(cpu_model, **options) as (client, engines, _):
        response = await client.post("/v1/completions", json=body)
    *_, failure, done = events(response.text)
    assert failure["error"]["code"] == ENGINE_UNAVAILABLE and done == "[DONE]"
    assert engines["smollm2"].calls == []  # the second replica was not asked
    assert "return_token_ids" not in response.text


# -- the rules, alone ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ({}, True),
        ({"n": 2}, False),
        ({"logprobs": 1}, False),
        ({"echo": True}, False),
        ({"suffix": "x"}, False),
        ({"best_of": 2}, False),
        ({"prompt": ["a", "b"]}, False),
        ({"prompt": [1, 2, 3]}, True),
        ({"response_format": {"type": "json_object"}}, False),
        ({"stream": False}, False),
        ({"stream_options": {"continuous_usage_stats": True}}, False),
    ],
)
def test_which_completions_migrate(extra, expected):
    request = CompletionRequest.model_validate({**BODY, **extra})
    assert (migratable("completions", request, {}) is not None) is expected


TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}


@pytest.mark.parametrize(
    ("extra", "engine_args", "expected"),
    [
        ({}, {}, True),
        ({"tools": [TOOL]}, {}, False),
        ({"tools": [TOOL], "tool_choice": "none"}, {}, True),
        ({"logprobs": True}, {}, False),
        ({}, {"reasoning_parser": "deepseek_r1"}, False),
    ],
)
def test_which_chats_migrate(extra, engine_args, expected):
    request = ChatCompletionRequest.model_validate({**CHAT, **extra})
    assert (migratable("chat", request, engine_args) is not None) is expected


def test_a_continuation_carries_the_sampling_and_counts_down_the_output():
    body = {**CHAT, "temperature": 0.5, "seed": 3, "stop": ["\n"], "min_tokens": 4, "priority": 2,
            "tools": [TOOL], "tool_choice": "none", "return_token_ids": True}  # fmt: skip
    stream = migratable("chat", ChatCompletionRequest.model_validate(body), {})
    assert stream is not None
    stream.take(b'data: {"id":"c","created":1,"model":"m","choices":[{"index":0,"delta":'
                b'{"role":"assistant","content":""}}],"prompt_token_ids":[5,6]}')  # fmt: skip
    kept = stream.take(b'data: {"id":"c","choices":[{"index":0,"delta":{"content":"a"},'
                       b'"finish_reason":null,"token_ids":[9,10,11]}]}')  # fmt: skip
    assert b'"token_ids":[9,10,11]' in kept  # the client asked for them
    continued = stream.continuation(body)
    assert continued == {
        "model": "smollm2", "prompt": [5, 6, 9, 10, 11], "max_tokens": 5, "min_tokens": 1,
        "temperature": 0.5, "seed": 3, "stop": ["\n"], "priority": 2, "stream": True,
        "stream_options": {"include_usage": True}, "return_token_ids": True,
    }  # fmt: skip


def test_token_ids_not_asked_for_are_taken_out():
    stream = Stream(chat=False)
    first = stream.take(b'data: {"id":"x","created":1,"model":"m","choices":[{"index":0,'
                        b'"text":"a","prompt_token_ids":[1,2],"token_ids":[3]}]}')  # fmt: skip
    assert first.endswith(b'"prompt_token_ids":null,"token_ids":null}]}\n\n')
    assert stream.prompt_ids == [1, 2] and stream.generated == [3]
    assert stream.take(b": vrstack-usage 2 1") == b"" and stream.usage == Usage(2, 1)
    assert stream.take(b"data: [DONE]") == b"data: [DONE]\n\n" and stream.done
    chat = Stream(chat=True)
    assert chat.take(b'data: {"choices":[{"index":0,"delta":{},"finish_reason":null,'
                     b'"token_ids":[4]}]}') == b""  # fmt: skip
    assert chat.generated == [4]


def test_token_ids_are_read_from_json_with_spaces_too():
    stream = Stream(chat=False)
    event = json.dumps({"id": "x", "choices": [{"index": 0, "text": "a", "finish_reason": "stop",
                        "prompt_token_ids": [1, 2], "token_ids": [3, 4]}]}).encode()  # fmt: skip
    assert b'"token_ids": [3, 4]' in event  # json.dumps's own spacing
    out = stream.take(b"data: " + event)
    assert stream.prompt_ids == [1, 2] and stream.generated == [3, 4] and stream.finished
    assert b'"prompt_token_ids": null, "token_ids": null' in out


def test_the_ending_names_the_replicas_unless_tenants_share_the_stack():
    stream = Stream(chat=False, id="x", prompt_ids=[1], generated=[2, 3], replicas=["a", "b"])
    stream.finished = True
    assert stream.ending() == b": vrstack-migrated 1 a,b 2\n\ndata: [DONE]\n\n"
    assert stream.ending(private=True) == b": vrstack-migrated 1 - 2\n\ndata: [DONE]\n\n"
