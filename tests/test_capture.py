"""Capture to trace: live requests through the real ingress app (engine doubles behind it)
recorded as lab trace lines (`app.capture`), downloaded from `GET /capture`, read by the lab."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import json
import random
import threading
import time
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
from typer.testing import CliRunner

from app.capture import CaptureStore, Recorder
from app.cli import cli
from app.config import load_config
from app.engines.http_server import EngineHttpServer
from app.ingress.asgi import create_app
from app.ingress.gateway import Gateway
from app.lab.run import LAB_POLICIES, run_lab
from app.lab.simulator import SimSettings
from app.lab.trace import BlockView, TraceRequest, parse_line, read_trace, write_trace
from app.lab.workloads import multi_round_qa, shared_prefix
from app.shared_actor import Local
from tests.engine_double import TOKEN, EngineDouble, Stack
from tests.test_auth_limits import bearer
from tests.test_ingress import assert_openai_error

pytestmark = pytest.mark.anyio
OUR_POLICIES = [p for p in LAB_POLICIES if ":" not in p and not p.startswith(("ps-", "ray-",
                "sglang-", "llmd-"))]  # fmt: skip
PEER_POLICIES = [p for p in LAB_POLICIES if p not in OUR_POLICIES]


@pytest.fixture
def anyio_backend():
    return "asyncio"


@contextlib.asynccontextmanager
async def capturing(
    cpu_model, capture=None, *, output_tokens=64, **extra
) -> AsyncIterator[tuple[httpx.AsyncClient, object]]:
    """The ingress app with `capture` configured over an engine double whose answers report
    `output_tokens`: (client, the app)."""
    config = load_config({"models": [cpu_model], "capture": capture or {}, **extra})
    engine = EngineDouble(config.models[0].name)
    engine.usage = {"prompt_tokens": 1, "completion_tokens": output_tokens, "total_tokens": 1}
    stack = await Stack({engine.name: engine}).start()
    gateway = Gateway(config, {}, token=TOKEN, routes=stack.get)
    app = create_app(gateway)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://stack") as client:
            yield client, app
    finally:
        await gateway.relay.close()
        await stack.stop()


async def send(client: httpx.AsyncClient, trace: list[TraceRequest], **headers) -> None:
    for r in trace:
        body = {"model": r.model, "prompt": r.prompt, "max_tokens": r.max_tokens}
        if r.session:
            body["user"] = r.session
        response = await client.post("/v1/completions", json=body, headers=headers)
        assert response.status_code == 200, response.text


async def captured(client: httpx.AsyncClient, **headers) -> list[TraceRequest]:
    response = await client.get("/capture", headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/x-ndjson")
    lines = response.text.splitlines()
    assert response.headers["x-vrstack-capture-records"] == str(len(lines))
    return [parse_line(line, i) for i, line in enumerate(lines, 1)]


@pytest.mark.parametrize(
    "workload",
    [
        lambda: shared_prefix(groups=4, prompts_per_group=10, system_prompt=300, question=40),
        lambda: multi_round_qa(users=6, rounds=4, system_prompt=200, history=100, answer=64),
    ],
    ids=["shared-prefix", "multi-round-qa"],
)
async def test_a_captured_trace_replays_in_the_lab_as_its_text_does(cpu_model, workload):
    text = [dataclasses.replace(r, model="smollm2", max_tokens=64) for r in workload()]
    async with capturing(cpu_model, output_tokens=20) as (client, _):  # answers end early
        await send(client, text)
        blocks = await captured(client)
    assert len(blocks) == len(text)
    for sent, line in zip(text, blocks, strict=True):
        assert line.prompt is None and line.tokens is None and line.blocks
        assert line.session == sent.session and line.max_tokens == 64 and line.output_tokens == 20
        assert line.prompt_tokens == sent.view().prompt_tokens
        assert list(line.blocks) == [h & (2**64 - 1) for h in sent.view().block_hashes()]
    assert blocks[0].t == 0 and all(a.t <= b.t for a, b in itertools.pairwise(blocks))
    # The text trace at the captured times and output lengths: the lab sees the same requests.
    timed = [
        dataclasses.replace(r, t=b.t, max_tokens=20) for r, b in zip(text, blocks, strict=True)
    ]
    settings = SimSettings(cache_blocks=256)
    ours = {f.policy: f.to_json() for f in run_lab(timed, OUR_POLICIES, 3, settings)}
    theirs = {f.policy: f.to_json() for f in run_lab(blocks, OUR_POLICIES, 3, settings)}
    assert ours == theirs
    assert any(f["hit_rate"] > 0.3 for f in ours.values())  # prefixes were shared
    # The peers' character trees see the blocks at block granularity: close, not equal.
    peers = {f.policy: f for f in run_lab(timed, PEER_POLICIES, 3, settings)}
    for f in run_lab(blocks, PEER_POLICIES, 3, settings):
        assert f.hit_rate == pytest.approx(peers[f.policy].hit_rate, abs=0.05), f.policy


async def test_a_blocks_trace_replays_at_coarser_block_sizes_only(cpu_model):
    # 144 shared tokens: 9 blocks of 16, 4.5 of 32 (a coarse block is every second hash)
    text = shared_prefix(groups=2, prompts_per_group=4, system_prompt=144, question=16)
    text = [dataclasses.replace(r, model="smollm2") for r in text]
    async with capturing(cpu_model) as (client, _):
        await send(client, text)
        blocks = await captured(client)
    timed = [dataclasses.replace(r, t=b.t) for r, b in zip(text, blocks, strict=True)]
    settings = SimSettings(block_size=32)
    assert [f.to_json() for f in run_lab(timed, ["prefix"], 2, settings)] == [
        f.to_json() for f in run_lab(blocks, ["prefix"], 2, settings)
    ]
    with pytest.raises(ValueError, match="multiple"):
        run_lab(blocks, ["prefix"], 2, SimSettings(block_size=24))


async def test_include_text_keeps_prompts_messages_and_token_ids(cpu_model, tmp_path):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    async with capturing(cpu_model, {"include_text": True}) as (client, _):
        await client.post("/v1/completions", json={"model": "default", "prompt": "hello"})
        await client.post("/v1/completions", json={"model": "smollm2", "prompt": [5, 6, 7]})
        await client.post("/v1/chat/completions", json={"model": "smollm2", "messages": messages})
        await client.post("/v1/embeddings", json={"model": "smollm2", "input": "not recorded"})
        response = await client.get("/capture")
    lines = [json.loads(line) for line in response.text.splitlines()]
    assert [line.get("endpoint") for line in lines] == ["completions", "completions", "chat"]
    assert lines[0]["prompt"] == "hello" and lines[0]["model"] == "smollm2"  # canonical name
    assert lines[1]["tokens"] == [5, 6, 7] and lines[2]["messages"] == messages
    assert not any("blocks" in line for line in lines)
    path = tmp_path / "text.jsonl"
    path.write_text(response.text)
    back = read_trace(path)
    assert back[2].prompt == "system: be brief\nuser: hi\n" and back[1].tokens == [5, 6, 7]
    assert not isinstance(back[0].view(), BlockView)


async def test_without_include_text_no_prompt_text_is_kept(cpu_model):
    secret = "the launch code is 0000 " * 8
    async with capturing(cpu_model) as (client, _):
        await client.post("/v1/completions", json={"model": "smollm2", "prompt": secret})
        messages = [{"role": "user", "content": secret}]
        await client.post("/v1/chat/completions", json={"model": "smollm2", "messages": messages})
        response = await client.get("/capture")
    assert "launch" not in response.text and response.text.count('"blocks"') == 2


async def test_sampling_records_the_share_asked_for(cpu_model):
    async with capturing(cpu_model, {"sample_ratio": 0.3}) as (client, app):
        app.capture._sample = random.Random(7).random
        await send(client, [TraceRequest(0, "smollm2", prompt=f"p{i}") for i in range(40)])
        got = await captured(client)
    draws = random.Random(7)
    assert len(got) == sum(draws.random() < 0.3 for _ in range(40)) > 0


async def test_at_most_max_records_are_kept_the_newest(cpu_model):
    async with capturing(cpu_model, {"max_records": 5}) as (client, _):
        await send(client, [TraceRequest(0, "smollm2", prompt=f"{i:03d} " * 20) for i in range(8)])
        status = (await client.get("/capture/status")).json()
        got = await captured(client)
    assert status["records"] == 5 and status["dropped"] == 3
    assert status["max_records"] == 5 and status["block_size"] == 16
    first = TraceRequest(0, "smollm2", prompt="003 " * 20).view().block_hashes()[0]
    assert got[0].blocks[0] == first  # the three oldest went


async def test_requests_that_reach_no_engine_are_not_recorded(cpu_model):
    async with capturing(cpu_model, limits={"max_tokens": 8}) as (client, _):
        body = {"model": "smollm2", "prompt": "x", "max_tokens": 9}
        assert (await client.post("/v1/completions", json=body)).status_code == 400
        assert (await client.post("/v1/completions", json={**body, "model": "no"})).status_code
        assert await captured(client) == []


async def test_every_replica_records_into_one_trace_ordered_by_time(cpu_model):
    shared = Local(CaptureStore(100))
    async with capturing(cpu_model) as (one, app1), capturing(cpu_model) as (two, app2):
        app1.capture.share(shared)
        app2.capture.share(shared)
        for i in range(6):
            body = {"model": "smollm2", "prompt": f"r{i} " * 100}
            await (one if i % 2 else two).post("/v1/completions", json=body)
        await app2.capture.flush()  # as its own flush loop would
        got = await captured(one)
    assert [r.prompt_tokens for r in got] == [75] * 6  # "rI " * 100: 300 bytes
    assert len(got) == 6 and all(a.t <= b.t for a, b in itertools.pairwise(got))
    sent = [TraceRequest(0, "m", prompt=f"r{i} " * 100).view().block_hashes() for i in range(6)]
    assert [list(r.blocks) for r in got] == [list(h) for h in sent]
    assert all(len(r.blocks) == 4 for r in got)


async def test_capture_needs_a_key_and_not_a_tenants(cpu_model):
    tenants = [{"name": "a", "api_keys": ["sk-a"]}]
    auth = {"api_keys": ["sk-op"], "api_keys_env": None}  # /metrics and /usage stay open
    async with capturing(cpu_model, auth=auth, tenants=tenants) as (client, _):
        await send(client, [TraceRequest(0, "smollm2", prompt="hi " * 30)], **bearer("sk-a"))
        for path in ("/capture", "/capture/status"):
            assert_openai_error(await client.get(path), 401)
            assert_openai_error(await client.get(path, headers=bearer("sk-a")), 403)
        got = await captured(client, **bearer("sk-op"))
        assert (await client.get("/usage")).status_code == 200
    assert [r.tenant for r in got] == ["a"]


async def test_capture_off_answers_404_and_records_nothing(cpu_model):
    config = load_config({"models": [cpu_model]})
    app = create_app(Gateway(config, {}, token=TOKEN))
    assert app.capture is None
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://stack") as client:
        error = assert_openai_error(await client.get("/capture"), 404)
    assert error["code"] == "capture_disabled"
    assert Recorder.of(load_config({"models": [cpu_model], "capture": {"enabled": False}})) is None


@contextlib.contextmanager
def served(cpu_model, capture: dict, **extra) -> Iterator[str]:
    """The ingress app with `capture` on a real loopback HTTP server (its own event loop, in a
    thread), over an engine double: its URL."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    config = load_config({"models": [cpu_model], "capture": capture, **extra})
    stack = Stack({"smollm2": EngineDouble("smollm2")})

    async def start() -> tuple[Gateway, EngineHttpServer, str]:
        await stack.start()
        gateway = Gateway(config, {}, token=TOKEN, routes=stack.get)
        server = EngineHttpServer(create_app(gateway), host="127.0.0.1")  # any ASGI app
        return gateway, server, await server.start()

    async def stop(gateway: Gateway, server: EngineHttpServer) -> None:
        await server.stop(drain_s=0.1)
        await gateway.relay.close()
        await stack.stop()

    gateway, server, url = asyncio.run_coroutine_threadsafe(start(), loop).result(30)
    try:
        yield url
    finally:
        asyncio.run_coroutine_threadsafe(stop(gateway, server), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


def _post(url: str, prompts: list[str], delay_s: float = 0.0) -> None:
    time.sleep(delay_s)
    for prompt in prompts:
        body = {"model": "smollm2", "prompt": prompt, "max_tokens": 3}
        assert httpx.post(url + "/v1/completions", json=body).status_code == 200


def test_the_capture_command_writes_a_trace_the_lab_reads(cpu_model, tmp_path):
    out, recent = tmp_path / "all.jsonl", tmp_path / "recent.jsonl"
    with served(cpu_model, {"flush_s": 0.1}) as url:
        _post(url, ["before " * 40, "before " * 41])
        result = CliRunner().invoke(cli, ["capture", "--url", url, "--out", str(out)])
        assert result.exit_code == 0, result.output
        later = threading.Thread(target=_post, args=(url, ["during " * 50], 0.2))
        later.start()
        args = ["capture", "--url", url, "-o", str(recent), "--seconds", "0.5"]
        timed = CliRunner().invoke(cli, args)
        later.join()
    assert timed.exit_code == 0, timed.output
    assert "wrote 2 requests" in result.output
    assert [r.prompt_tokens for r in read_trace(out)] == [70, 72]  # 7 bytes a word
    assert [r.prompt_tokens for r in read_trace(recent)] == [88]  # only what came meanwhile
    lab = CliRunner().invoke(cli, ["lab", "--trace", str(out), "--policy", "prefix", "--json"])
    assert lab.exit_code == 0, lab.output
    assert json.loads(lab.output)["requests"] == 2


def test_the_capture_command_says_why_it_cannot_read(cpu_model, tmp_path):
    out = tmp_path / "x.jsonl"
    auth = {"api_keys": ["sk-op"], "api_keys_env": None}
    with served(cpu_model, {}, auth=auth) as url:
        refused = CliRunner().invoke(cli, ["capture", "--url", url, "--out", str(out)])
        keyed = CliRunner().invoke(cli, ["capture", "--url", url, "-o", str(out)],
                                   env={"VRSTACK_API_KEY": "sk-op"})  # fmt: skip
    assert refused.exit_code == 1 and "401" in refused.output, refused.output
    assert keyed.exit_code == 0 and "wrote 0 requests" in keyed.output, keyed.output
    gone = CliRunner().invoke(cli, ["capture", "--url", "http://127.0.0.1:1", "-o", str(out)])
    assert gone.exit_code == 1 and "cannot reach" in gone.output
    assert "Traceback" not in refused.output + gone.output


def test_blocks_lines_round_trip_and_bad_ones_name_the_line(tmp_path):
    line = TraceRequest(1.5, "m", blocks=[1, 2**64 - 1], prompt_tokens=40, output_tokens=3,
                        endpoint="chat", session="s", tenant="a")  # fmt: skip
    path = tmp_path / "t.jsonl"
    write_trace(path, [line])
    text = path.read_text()
    assert '"blocks":["0000000000000001","ffffffffffffffff"]' in text
    (back,) = read_trace(path)
    assert back.to_json() == line.to_json() and back.view().prompt_tokens == 40
    assert list(back.view().block_hashes()) == [1, 2**64 - 1]
    for bad in ('{"t": 0, "blocks": ["xyz"]}', '{"t": 0, "blocks": [], "block_size": 0}',
                '{"t": 0, "blocks": ["01"], "prompt": "x"}'):  # fmt: skip
        with pytest.raises(ValueError, match="trace line 3"):
            parse_line(bad, 3)
