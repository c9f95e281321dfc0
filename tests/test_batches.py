"""Files and batches (`app.batches`, `/v1/files`, `/v1/batches`): the store alone, the input
file's checks, and the whole API in-process with the `openai` client, the ingress's batch
worker answering through engine doubles' handles."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator

import openai
import pytest

from app.batches import BatchStore, BatchWorker, read_requests
from app.batches.store import Work, result_line
from app.config import load_config
from app.config.batches import BatchSettings
from app.errors import OpenAIError
from app.ingress.gateway import Gateway
from app.shared_actor import Local
from tests.engine_double import EngineDouble, HandleDouble
from tests.test_ingress import make_client

pytestmark = pytest.mark.anyio
CHAT_URL = "/v1/chat/completions"
KEYS = {"auth": {"api_keys": ["sk-one", "sk-two"], "api_keys_env": None}}


@pytest.fixture
def anyio_backend():
    return "asyncio"


def line(custom_id: str, body: dict, url: str = CHAT_URL, method: str = "POST") -> bytes:
    item = {"custom_id": custom_id, "method": method, "url": url, "body": body}
    return json.dumps(item).encode() + b"\n"


def chat(text: str, model: str = "smollm2", **extra) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": text}], **extra}


# -- the store ------------------------------------------------------------------------------
class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def card(**fields) -> dict:
    return {"endpoint": CHAT_URL, "input_file_id": "file-x", "completion_window": "24h",
            "metadata": None, **fields}  # fmt: skip


def test_files_belong_to_their_owner_and_uploads_are_bounded():
    store = BatchStore(max_stored_bytes=10)
    kept = store.add_file("tenant:a", "in.jsonl", "batch", b"123456")
    assert kept is not None and kept["bytes"] == 6 and kept["object"] == "file"
    assert store.add_file("tenant:a", "more.jsonl", "batch", b"12345") is None  # past 10 bytes
    assert (
        store.file("tenant:b", kept["id"]) is None and store.content("tenant:b", kept["id"]) is None
    )
    assert not store.delete_file("tenant:b", kept["id"])
    assert [f["id"] for f in store.file_list("tenant:a")] == [kept["id"]]
    assert store.delete_file("tenant:a", kept["id"]) and store.uploaded == 0
    assert store.add_file("tenant:a", "more.jsonl", "batch", b"12345") is not None


def test_a_batch_runs_to_its_output_and_error_files():
    store = BatchStore(max_stored_bytes=2**20)
    requests = [("a", chat("1")), ("b", chat("2")), ("c", chat("3"))]
    created = store.create_batch("key:k", card(), requests, [])
    assert created["status"] == "in_progress" and created["request_counts"]["total"] == 3
    claimed = store.claim(5)
    assert [w.custom_id for w in claimed] == ["a", "b", "c"] and store.claim(5) == []
    for work in reversed(claimed):  # answers come in any order; the files keep the input's
        status = 400 if work.custom_id == "b" else 200
        store.report(work.batch_id, work.index, status == 200,
                     result_line(work, status, {"n": work.index}, "req"))  # fmt: skip
    done = store.batch("key:k", created["id"])
    assert done["status"] == "completed" and done["request_counts"] == {
        "total": 3, "completed": 2, "failed": 1}  # fmt: skip
    output = store.content("key:k", done["output_file_id"]).decode().splitlines()
    assert [json.loads(x)["custom_id"] for x in output] == ["a", "c"]
    (error,) = store.content("key:k", done["error_file_id"]).decode().splitlines()
    assert json.loads(error)["response"]["status_code"] == 400
    assert store.batch("key:other", created["id"]) is None


def test_a_lost_claim_is_handed_out_again_and_reported_once():
    clock = Clock()
    store = BatchStore(2**20, monotonic=clock, lease_s=60)
    created = store.create_batch("o", card(), [("a", chat("1"))], [])
    (first,) = store.claim(1)
    assert store.claim(1) == []
    clock.now += 61  # the replica that claimed it died
    (again,) = store.claim(1)
    assert again.index == first.index
    store.report(again.batch_id, again.index, True, b"{}\n")
    store.report(first.batch_id, first.index, True, b"{}\n")  # late: ignored
    assert store.batch("o", created["id"])["request_counts"]["completed"] == 1


def test_cancelling_stops_handing_out_and_ends_when_the_claimed_are_in():
    store = BatchStore(2**20)
    created = store.create_batch("o", card(), [("a", chat("1")), ("b", chat("2"))], [])
    (work,) = store.claim(1)
    assert store.cancel("o", created["id"])["status"] == "cancelling"
    assert store.claim(5) == []
    store.report(work.batch_id, work.index, True, b'{"custom_id":"a"}\n')
    done = store.batch("o", created["id"])
    assert done["status"] == "cancelled" and done["cancelled_at"] is not None
    assert store.content("o", done["output_file_id"]) == b'{"custom_id":"a"}\n'


def test_a_batch_past_its_window_expires_keeping_what_completed():
    clock = Clock()
    store = BatchStore(2**20, clock=clock)
    created = store.create_batch("o", card(), [("a", chat("1")), ("b", chat("2"))], [])
    (work,) = store.claim(1)
    store.report(work.batch_id, work.index, True, b"{}\n")
    clock.now += 24 * 3600
    expired = store.batch("o", created["id"])
    assert expired["status"] == "expired" and expired["request_counts"]["completed"] == 1
    assert store.claim(5) == [] and expired["output_file_id"] is not None


# -- the input file -------------------------------------------------------------------------
def test_every_faulty_line_is_named_with_its_number():
    def check(request) -> None:
        if request.model != "smollm2":
            raise OpenAIError(404, "no such model", param="model", code="model_not_found")

    data = b"".join([
        line("ok", chat("hi")),
        b"not json\n",
        line("ok", chat("again")),
        line("url", chat("hi"), url="/v1/completions"),
        line("stream", chat("hi", stream=True)),
        line("model", chat("hi", model="nope")),
        line("get", chat("hi"), method="GET"),
        line("bad", {"model": "smollm2", "messages": []}),
    ])  # fmt: skip
    requests, faults = read_requests(data, CHAT_URL, 100, check)
    assert [r[0] for r in requests] == ["ok"]
    assert [(f["line"], f["code"], f["param"]) for f in faults] == [
        (2, "invalid_json", None),
        (3, "duplicate_custom_id", "custom_id"),
        (4, "mismatched_endpoint", "url"),
        (5, "invalid_value", "body.stream"),
        (6, "model_not_found", "body.model"),
        (7, "invalid_value", "method"),
        (8, "invalid_request", "body.messages"),
    ]
    assert read_requests(line("a", chat("1")) * 3, CHAT_URL, 2, check)[1][0]["code"] == (
        "too_many_requests"
    )


# -- the API, with the openai client ----------------------------------------------------------
@contextlib.asynccontextmanager
async def batch_api(cpu_model, **batches) -> AsyncIterator[tuple[dict, object, object]]:
    """openai clients for two keys over the ingress, its batch worker running."""
    config = {"models": [cpu_model], **KEYS, "batches": batches}
    slow = {"smollm2": "slow"}
    async with make_client(cpu_model, config=config, modes=slow) as (http, engines, _):
        gateway: Gateway = http._transport.app.gateway  # type: ignore[attr-defined]
        store = http._transport.app.batches  # type: ignore[attr-defined]
        worker = BatchWorker(gateway, store, gateway.config.batches, poll_s=0.05)
        task = asyncio.create_task(worker.run())
        clients = {
            key: openai.AsyncOpenAI(
                base_url="http://stack/v1", api_key=key, http_client=http, max_retries=0
            )
            for key in ("sk-one", "sk-two")
        }
        try:
            yield clients, engines["smollm2"], store
        finally:
            task.cancel()  # and wait: the worker lets go of the relay before it is closed
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def finished(client, batch_id: str) -> object:
    for _ in range(200):
        batch = await client.batches.retrieve(batch_id)
        if batch.status in ("completed", "failed", "cancelled", "expired"):
            return batch
        await asyncio.sleep(0.05)
    raise AssertionError(f"batch {batch_id} did not finish")


async def test_the_openai_clients_batch_api_runs_a_batch_to_its_results(cpu_model):
    data = b"".join(line(f"q{i}", chat(f"question {i}", max_tokens=4)) for i in range(3))
    async with batch_api(cpu_model, max_concurrent=1) as (clients, engine, _):
        one = clients["sk-one"]
        upload = await one.files.create(file=("in.jsonl", data), purpose="batch")
        batch = await one.batches.create(
            input_file_id=upload.id, endpoint=CHAT_URL, completion_window="24h",
            metadata={"job": "t"},
        )  # fmt: skip
        assert batch.status == "in_progress" and batch.metadata == {"job": "t"}
        done = await finished(one, batch.id)
        assert done.status == "completed" and done.request_counts.completed == 3
        output = (await one.files.content(done.output_file_id)).text.splitlines()
        answers = {json.loads(x)["custom_id"]: json.loads(x)["response"] for x in output}
        assert sorted(answers) == ["q0", "q1", "q2"]
        for custom_id, response in answers.items():
            assert response["status_code"] == 200
            sent = response["body"]["echo"]  # what reached the engine
            assert sent["messages"][0]["content"] == f"question {custom_id[1]}"
        assert engine.most_running == 1  # max_concurrent: one at a time
        assert [b.id for b in (await one.batches.list()).data] == [batch.id]
        # Another key sees none of it.
        two = clients["sk-two"]
        with pytest.raises(openai.NotFoundError):
            await two.batches.retrieve(batch.id)
        with pytest.raises(openai.NotFoundError):
            await two.files.content(done.output_file_id)
        assert (await two.batches.list()).data == []
        deleted = await one.files.delete(upload.id)
        assert deleted.deleted and deleted.id == upload.id


async def test_a_faulty_input_file_makes_a_failed_batch_naming_its_lines(cpu_model):
    data = line("a", chat("hi")) + line("b", chat("hi", model="unknown"))
    async with batch_api(cpu_model) as (clients, engine, _):
        one = clients["sk-one"]
        upload = await one.files.create(file=("in.jsonl", data), purpose="batch")
        batch = await one.batches.create(input_file_id=upload.id, endpoint=CHAT_URL,
                                         completion_window="24h")  # fmt: skip
        assert batch.status == "failed" and batch.errors is not None
        (fault,) = batch.errors.data
        assert (fault.line, fault.code, fault.param) == (2, "model_not_found", "body.model")
        assert engine.calls == []


async def test_bad_requests_to_the_api_are_openai_errors(cpu_model):
    async with batch_api(cpu_model) as (clients, _, _):
        one = clients["sk-one"]
        with pytest.raises(openai.BadRequestError) as purpose:
            await one.files.create(file=("in.jsonl", b"{}"), purpose="fine-tune")
        assert purpose.value.body["param"] == "purpose"
        with pytest.raises(openai.NotFoundError) as missing:
            await one.batches.create(input_file_id="file-nope", endpoint=CHAT_URL,
                                     completion_window="24h")  # fmt: skip
        assert missing.value.body["param"] == "input_file_id"
        upload = await one.files.create(file=("in.jsonl", line("a", chat("x"))), purpose="batch")
        with pytest.raises(openai.BadRequestError) as endpoint:
            await one.batches.create(input_file_id=upload.id, endpoint="/v1/moderations",
                                     completion_window="24h")  # type: ignore[arg-type]  # fmt: skip
        assert endpoint.value.body["param"] == "endpoint"


async def test_an_upload_past_the_file_limit_is_413(cpu_model):
    async with batch_api(cpu_model, max_file_bytes=1024) as (clients, _, store):
        with pytest.raises(openai.APIStatusError) as large:
            await clients["sk-one"].files.create(file=("in.jsonl", b"x" * 5000), purpose="batch")
        assert large.value.status_code == 413 and large.value.body["code"] == "file_too_large"
        assert (await store.status())["files"] == 0


async def test_a_batch_can_be_cancelled_while_it_runs(cpu_model):
    data = b"".join(line(f"q{i}", chat(f"q {i}")) for i in range(6))
    async with batch_api(cpu_model) as (clients, engine, _):
        one = clients["sk-one"]
        upload = await one.files.create(file=("in.jsonl", data), purpose="batch")
        batch = await one.batches.create(input_file_id=upload.id, endpoint=CHAT_URL,
                                         completion_window="24h")  # fmt: skip
        while not engine.calls:
            await asyncio.sleep(0.02)
        assert (await one.batches.cancel(batch.id)).status in ("cancelling", "cancelled")
        done = await finished(one, batch.id)
        assert done.status == "cancelled" and 1 <= done.request_counts.completed < 6
        assert len(engine.calls) == done.request_counts.completed


async def test_no_batch_request_starts_while_the_models_engines_queue(cpu_model):
    """Engines reporting queued or interactive requests hold batch work back until they report
    none; on engines that schedule by priority, batch requests carry the lowest."""
    priority_engines = {**cpu_model, "engine_args": {"scheduling_policy": "priority"}}
    config = load_config({"models": [priority_engines]})
    busy = {"smollm2": (0, 3)}
    engine = EngineDouble("smollm2")
    gateway = Gateway(config, {"smollm2": HandleDouble(engine)},
                      routes=lambda _: _OneReplica())  # fmt: skip
    store = BatchStore(2**20)
    store.create_batch("o", card(), [("a", chat("1", max_tokens=2))], [])
    worker = BatchWorker(gateway, Local(store), BatchSettings(), busy=busy.get, poll_s=0.01)
    task = asyncio.create_task(worker.run())
    try:
        await asyncio.sleep(1.2)
        assert engine.calls == []  # held back
        busy["smollm2"] = (1, 0)  # queue empty, an interactive request in flight
        await asyncio.sleep(1.2)
        assert engine.calls == []  # still held back (max_interactive 0)
        busy["smollm2"] = (0, 0)
        for _ in range(100):
            if engine.calls:
                break
            await asyncio.sleep(0.02)
        ((_, body),) = engine.calls
        assert body["model"] == "smollm2" and body["priority"] == BatchSettings().priority
    finally:
        task.cancel()


async def test_a_request_failing_with_a_5xx_is_tried_again(cpu_model, monkeypatch):
    monkeypatch.setattr("app.batches.worker.RETRY_S", 0.01)
    engine = EngineDouble("smollm2", mode="error500")  # an engine failing, then not
    gateway = Gateway(load_config({"models": [cpu_model]}), {"smollm2": HandleDouble(engine)},
                      routes=lambda _: _OneReplica())  # fmt: skip
    store = BatchStore(2**20)
    created = store.create_batch("o", card(), [("a", chat("1"))], [])
    worker = BatchWorker(gateway, Local(store), BatchSettings(), busy=lambda _: (0, 0), poll_s=0.01)
    task = asyncio.create_task(worker.run())
    try:
        while not engine.calls:
            await asyncio.sleep(0.01)
        engine.mode = "ok"
        for _ in range(200):
            if store.batch("o", created["id"])["status"] == "completed":
                break
            await asyncio.sleep(0.01)
    finally:
        task.cancel()
    done = store.batch("o", created["id"])
    assert done["request_counts"] == {"total": 1, "completed": 1, "failed": 0}
    assert len(engine.calls) >= 2


class _OneReplica:
    replicas_known = True

    def replica_count(self) -> int:
        return 1


def test_a_result_line_is_openais():
    work = Work("batch-1", 0, "q0", CHAT_URL, chat("x"))
    ok = json.loads(result_line(work, 200, {"id": "c"}, "req-1"))
    assert ok["custom_id"] == "q0" and ok["error"] is None
    assert ok["response"] == {"status_code": 200, "request_id": "req-1", "body": {"id": "c"}}
    failed = json.loads(result_line(work, 400, {"error": {"message": "m", "code": "c"}}, "r"))
    assert failed["error"] == {"code": "c", "message": "m"}


def test_the_api_takes_every_endpoint_a_batch_can_run():
    from typing import get_args

    from app.batches import ENDPOINTS
    from app.ingress.routes.batches import BatchEndpoint

    assert set(get_args(BatchEndpoint)) == set(ENDPOINTS)
