"""/v1/responses through the ingress app, called with the `openai` client, over an engine double
that answers chat as vLLM does (its reply names the turn and the user's last words, so a lost
conversation shows): stored responses shared by two ingress apps (replicas), streaming in
OpenAI's Responses events, owner isolation, admission, and every bad input a 4xx."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import pytest
from openai import AsyncOpenAI

from app.config import load_config
from app.ingress.asgi import StackApp, create_app
from app.ingress.gateway import Gateway
from app.responses import ResponseStore
from app.shared_actor import Local
from tests.engine_double import LoopbackRoutes
from tests.test_ingress import assert_openai_error

pytestmark = pytest.mark.anyio
NO_AUTH = {"api_keys_env": None}


@pytest.fixture
def anyio_backend():
    return "asyncio"


class ChatEngine:
    """Stands in for an engine deployment's Serve handle (`serve_openai`): chat answers as
    vLLM's, JSON or chunks with usage last. Its reply is `turn N: <the user's last message>`,
    N the user messages it was given; `finish` its finish reason; `fail_midway`: an in-band
    error after the first chunk; `refuse`: a 400 before answering."""

    def __init__(self, finish: str = "stop", fail_midway: bool = False, refuse: bool = False):
        self.finish = finish
        self.fail_midway = fail_midway
        self.refuse = refuse
        self.bodies: list[dict[str, Any]] = []

    def options(self, **_: Any) -> ChatEngine:
        return self

    def remote(self, endpoint: str, body: dict[str, Any]) -> AsyncIterator[dict]:
        assert endpoint == "chat"
        self.bodies.append(body)
        return self._items(body)

    async def _items(self, body: dict[str, Any]) -> AsyncIterator[dict]:
        if self.refuse:
            error = {"message": "the prompt is too long", "type": "BadRequestError",
                     "param": "messages", "code": 400}  # fmt: skip
            yield {"status": 400, "error": error}
            return
        users = [m["content"] for m in body["messages"] if m["role"] == "user"]
        words = f"turn {len(users)}: {users[-1]}".split(" ")
        prompt = sum(len(m["content"].split()) for m in body["messages"])
        usage = {"prompt_tokens": prompt, "completion_tokens": len(words),
                 "total_tokens": prompt + len(words)}  # fmt: skip
        if not body.get("stream"):
            message = {"role": "assistant", "content": " ".join(words)}
            choice = {"index": 0, "message": message, "finish_reason": self.finish}
            answer = {"id": "chatcmpl-1", "object": "chat.completion", "created": 7,
                      "model": body["model"], "choices": [choice], "usage": usage}  # fmt: skip
            yield {"body": answer}
            return
        for i, word in enumerate(words):
            if self.fail_midway and i == 1:
                yield {"status": 500, "error": {"message": "the engine died", "code": "x"}}
                return
            last = i == len(words) - 1
            delta = {"content": word if last else word + " "}
            choice = {"index": 0, "delta": delta, "finish_reason": self.finish if last else None}
            yield {"chunk": {"model": body["model"], "choices": [choice]}}
        yield {"chunk": {"model": body["model"], "choices": [], "usage": usage}}


@contextlib.asynccontextmanager
async def replicas(
    cpu_model: dict, engine: ChatEngine | None = None, count: int = 2, **settings: Any
) -> AsyncIterator[tuple[list[StackApp], ChatEngine]]:
    """`count` ingress apps (replicas) of one config over one engine, sharing one store as
    the replicas of an application share its store actor."""
    config = load_config({"models": [cpu_model], "auth": NO_AUTH, **settings})
    engine = engine or ChatEngine()
    routes = LoopbackRoutes("smollm2", ["http://127.0.0.1:1"])  # a running replica
    shared = Local(ResponseStore(config.responses.max_stored, config.responses.ttl_s))
    apps = []
    for _ in range(count):
        app = create_app(Gateway(config, {"smollm2": engine}, routes=lambda _: routes))
        app.api.state.responses_store = shared
        apps.append(app)
    yield apps, engine


def http(app: StackApp) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://stack")


def client(app: StackApp, key: str = "unused") -> AsyncOpenAI:
    return AsyncOpenAI(base_url="http://stack/v1", api_key=key, http_client=http(app),
                       max_retries=0)  # fmt: skip


async def test_a_conversation_carries_across_replicas(cpu_model):
    async with replicas(cpu_model) as (apps, engine):
        one, two = client(apps[0]), client(apps[1])
        first = await one.responses.create(
            model="default", input="My name is Ada.", instructions="Be brief.",
            max_output_tokens=20, temperature=0, metadata={"case": "1"},
        )  # fmt: skip
        assert first.id.startswith("resp_") and first.status == "completed"
        assert first.output_text == "turn 1: My name is Ada."
        assert first.model == "smollm2" and first.metadata == {"case": "1"}
        assert first.usage.input_tokens == 6 and first.usage.output_tokens == 6
        assert engine.bodies[-1]["messages"] == [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "My name is Ada."},
        ]
        assert engine.bodies[-1]["max_tokens"] == 20 and engine.bodies[-1]["temperature"] == 0

        second = await two.responses.create(
            model="default", input="What is my name?", previous_response_id=first.id
        )
        assert second.output_text == "turn 2: What is my name?"
        assert second.previous_response_id == first.id
        assert engine.bodies[-1]["messages"] == [
            {"role": "user", "content": "My name is Ada."},
            {"role": "assistant", "content": "turn 1: My name is Ada."},
            {"role": "user", "content": "What is my name?"},
        ]
        third = await one.responses.create(
            model="default", input=[{"role": "user", "content": "Thanks."}],
            previous_response_id=second.id,
        )  # fmt: skip
        assert third.output_text == "turn 3: Thanks."

        items = await two.responses.input_items.list(third.id, order="asc")
        texts = [item.content[0].text for item in items.data]
        assert texts == ["My name is Ada.", "turn 1: My name is Ada.", "What is my name?",
                         "turn 2: What is my name?", "Thanks."]  # fmt: skip
        newest = await one.responses.input_items.list(third.id, limit=2)
        assert [i.content[0].text for i in newest.data] == texts[::-1][:2] and newest.has_more
        after = await one.responses.input_items.list(third.id, limit=2, after=newest.last_id)
        assert [i.content[0].text for i in after.data] == texts[::-1][2:4]

        fetched = await two.responses.retrieve(second.id)
        assert fetched.output_text == second.output_text and fetched.id == second.id


async def test_unprefixed_paths_answer_too(cpu_model):
    async with replicas(cpu_model, count=1) as (apps, _), http(apps[0]) as raw:
        made = await raw.post("/responses", json={"model": "smollm2", "input": "hi"})
        assert made.status_code == 200, made.text
        response_id = made.json()["id"]
        assert (await raw.get(f"/responses/{response_id}")).json()["id"] == response_id
        items = (await raw.get(f"/responses/{response_id}/input_items")).json()
        assert items["object"] == "list" and items["data"][0]["role"] == "user"
        deleted = (await raw.delete(f"/responses/{response_id}")).json()
        assert deleted == {"id": response_id, "object": "response.deleted", "deleted": True}


async def test_streams_parse_with_both_client_apis_and_are_stored(cpu_model):
    async with replicas(cpu_model) as (apps, _):
        one, two = client(apps[0]), client(apps[1])
        stream = await one.responses.create(model="smollm2", input="Hello there", stream=True)
        events = [event async for event in stream]
        assert [e.type for e in events] == [
            "response.created", "response.in_progress", "response.output_item.added",
            "response.content_part.added", *["response.output_text.delta"] * 4,
            "response.output_text.done", "response.content_part.done",
            "response.output_item.done", "response.completed",
        ]  # fmt: skip
        assert [e.sequence_number for e in events] == list(range(len(events)))
        deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
        final = events[-1].response
        assert deltas == final.output_text == "turn 1: Hello there"
        assert final.usage.total_tokens == 6 and final.id == events[0].response.id

        async with two.responses.stream(
            model="smollm2", input="And now?", previous_response_id=final.id
        ) as streamed:
            texts = [e.delta async for e in streamed if e.type == "response.output_text.delta"]
            done = await streamed.get_final_response()
        assert "".join(texts) == done.output_text == "turn 2: And now?"
        stored = await one.responses.retrieve(done.id)
        assert stored.output_text == "turn 2: And now?" and stored.previous_response_id == final.id


async def test_not_stored_deleted_and_unknown_responses(cpu_model):
    async with replicas(cpu_model) as (apps, _):
        one, two = client(apps[0]), client(apps[1])
        kept = await one.responses.create(model="smollm2", input="a")
        fleeting = await one.responses.create(model="smollm2", input="b", store=False)
        assert fleeting.store is False
        with pytest.raises(openai.NotFoundError):
            await two.responses.retrieve(fleeting.id)
        deleted = await two.responses.delete(kept.id)  # the client answers None
        assert deleted is None
        for call in (two.responses.retrieve, two.responses.delete, one.responses.input_items.list):
            with pytest.raises(openai.NotFoundError) as missing:
                await call(kept.id)
            assert missing.value.code == "response_not_found"
        for gone in (kept.id, fleeting.id, "resp_nope"):
            with pytest.raises(openai.BadRequestError) as refused:
                await one.responses.create(model="smollm2", input="c", previous_response_id=gone)
            assert refused.value.code == "previous_response_not_found"
            assert refused.value.param == "previous_response_id"


async def test_a_stored_response_is_its_owners_alone(cpu_model):
    tenants = [
        {"name": "a", "api_keys": ["sk-a1", "sk-a2"]},
        {"name": "b", "api_keys": ["sk-b"]},
    ]
    auth = {"api_keys": ["sk-plain", "sk-other"], "api_keys_env": None}
    async with replicas(cpu_model, auth=auth, tenants=tenants) as (apps, _):
        a1, a2, b = (client(apps[i % 2], key) for i, key in enumerate(["sk-a1", "sk-a2", "sk-b"]))
        plain, other = client(apps[0], "sk-plain"), client(apps[1], "sk-other")
        mine = await a1.responses.create(model="smollm2", input="tenant a's secret")
        assert (await a2.responses.retrieve(mine.id)).id == mine.id  # the same tenant
        keys = await plain.responses.create(model="smollm2", input="a key's secret")
        for outsider, stored in ((b, mine), (plain, mine), (other, keys), (a1, keys)):
            with pytest.raises(openai.NotFoundError):
                await outsider.responses.retrieve(stored.id)
            with pytest.raises(openai.NotFoundError):
                await outsider.responses.input_items.list(stored.id)
            with pytest.raises(openai.NotFoundError):
                await outsider.responses.delete(stored.id)
            with pytest.raises(openai.BadRequestError) as refused:
                await outsider.responses.create(
                    model="smollm2", input="x", previous_response_id=stored.id
                )
            assert refused.value.code == "previous_response_not_found"
        assert (await a1.responses.retrieve(mine.id)).id == mine.id  # still there
        async with http(apps[0]) as raw:
            assert_openai_error(await raw.post("/v1/responses", json={}), 401)


async def test_an_answer_cut_at_its_length_is_incomplete(cpu_model):
    async with replicas(cpu_model, ChatEngine(finish="length"), count=1) as (apps, _):
        one = client(apps[0])
        cut = await one.responses.create(model="smollm2", input="go on", max_output_tokens=3)
        assert cut.status == "incomplete" and cut.incomplete_details.reason == "max_output_tokens"
        stream = await one.responses.create(model="smollm2", input="go on", stream=True)
        events = [event async for event in stream]
        assert events[-1].type == "response.incomplete"
        assert events[-1].response.status == "incomplete"


async def test_a_stream_that_fails_midway_ends_failed_and_is_not_stored(cpu_model):
    async with replicas(cpu_model, ChatEngine(fail_midway=True), count=1) as (apps, _):
        one = client(apps[0])
        stream = await one.responses.create(model="smollm2", input="hi there", stream=True)
        events = [event async for event in stream]
        assert events[-1].type == "response.failed"
        assert events[-1].response.status == "failed" and events[-1].response.error.message
        with pytest.raises(openai.NotFoundError):
            await one.responses.retrieve(events[-1].response.id)


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"input": "hi"}, 400, "model"),
        ({"model": "smollm2"}, 400, "input"),
        ({"model": "smollm2", "input": ""}, 400, "input"),
        ({"model": "smollm2", "input": 5}, 400, "input"),
        ({"model": "smollm2", "input": [{"role": "wizard", "content": "x"}]}, 400, "input.0.role"),
        ({"model": "smollm2", "input": "x", "tools": [{"type": "web_search"}]}, 400, "tools"),
        ({"model": "smollm2", "input": "x", "max_output_tokens": -1}, 400, "max_output_tokens"),
        ({"model": "smollm2", "input": "x", "max_output_tokens": 999}, 400, "max_output_tokens"),
        ({"model": "smollm2", "input": "x", "stream": "yes please"}, 400, "stream"),
        ({"model": "smollm2", "input": "x", "previous_response_id": ""}, 400,
         "previous_response_id"),
        ({"model": "gpt-9", "input": "x"}, 404, "model"),
    ],
)  # fmt: skip
async def test_bad_input_is_an_openai_error(cpu_model, body, status, param):
    async with replicas(cpu_model, count=1, limits={"max_tokens": 512}) as (apps, engine):
        async with http(apps[0]) as raw:
            assert_openai_error(await raw.post("/v1/responses", json=body), status, param)
            for text in (b"{not json", b"[1, 2]"):
                assert_openai_error(await raw.post("/v1/responses", content=text), 400)
            items = await raw.get("/v1/responses/resp_x/input_items", params={"limit": 0})
            assert_openai_error(items, 400, "limit")
        assert not engine.bodies


async def test_engine_refusals_and_a_disabled_endpoint(cpu_model):
    body = {"model": "smollm2", "input": "x"}
    refusing = ChatEngine(refuse=True)
    async with replicas(cpu_model, refusing, count=1) as (apps, _), http(apps[0]) as raw:
        error = assert_openai_error(await raw.post("/v1/responses", json=body), 400)
        assert "too long" in error["message"]
        stream = await raw.post("/v1/responses", json={**body, "stream": True})
        assert_openai_error(stream, 400)
    off = {"enabled": False}
    async with replicas(cpu_model, count=1, responses=off) as (apps, _), http(apps[0]) as raw:
        error = assert_openai_error(await raw.post("/v1/responses", json=body), 404)
        assert error["code"] == "responses_disabled"


async def test_admission_takes_the_keys_limits_and_metrics_count_it(cpu_model):
    per_key = {"requests_per_second": 0.01, "burst": 1}
    async with replicas(cpu_model, count=1, limits={"per_key": per_key}) as (apps, engine):
        one = client(apps[0])
        await one.responses.create(model="smollm2", input="x")
        with pytest.raises(openai.RateLimitError):
            await one.responses.create(model="smollm2", input="y")
        assert len(engine.bodies) == 1
        async with http(apps[0]) as raw:
            metrics = (await raw.get("/metrics")).text
        assert 'endpoint="responses"' in metrics and 'status="429"' in metrics
