"""`vrstack bench` against an in-test OpenAI stub served by uvicorn on loopback."""

from __future__ import annotations

import asyncio
import itertools
import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route
from typer.testing import CliRunner

from app.bench.load import BenchConfig, run_fixed, run_qa, run_trace
from app.bench.summary import summarize
from app.cli import cli
from app.lab.trace import TraceRequest, write_trace

CHUNKS = ["Hel", "lo", " wor", "ld", "!"]


@dataclass
class Stub:
    """An OpenAI API test double: streams CHUNKS with small sleeps; fails on request."""

    delay: float = 0.002
    fail: dict[int, int] = field(default_factory=dict)  # request number -> status
    received: list[dict[str, Any]] = field(default_factory=list)
    headers: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    async def handle(self, request: Request):
        body = await request.json()
        with self.lock:
            n = len(self.received)
            self.received.append(body)
            self.headers.append(request.headers.get("authorization", ""))
        if n in self.fail:
            return JSONResponse({"error": {"message": "no"}}, status_code=self.fail[n])
        chat = request.url.path.endswith("/chat/completions")

        def chunk(text: str) -> dict[str, Any]:
            choice = {"index": 0, "delta": {"content": text}} if chat else {"text": text}
            return {"id": "x", "choices": [choice]}

        usage = {"prompt_tokens": 3, "completion_tokens": len(CHUNKS), "total_tokens": 8}
        if not body.get("stream"):
            await asyncio.sleep(self.delay * len(CHUNKS))
            text = "".join(CHUNKS)
            choice = {"message": {"role": "assistant", "content": text}} if chat else {"text": text}
            return JSONResponse({"id": "x", "choices": [choice], "usage": usage})

        async def gen():
            yield "data: " + json.dumps({"id": "x", "choices": [{"delta": {"role": "assistant"}}]})
            yield "\n\n"
            for text in CHUNKS:
                await asyncio.sleep(self.delay)
                yield f"data: {json.dumps(chunk(text))}\n\n"
            if (body.get("stream_options") or {}).get("include_usage"):
                yield f"data: {json.dumps({'id': 'x', 'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(gen(), media_type="text/event-stream")


@pytest.fixture
def stub() -> Iterator[tuple[Stub, str]]:
    s = Stub()
    app = Starlette(
        routes=[
            Route("/v1/chat/completions", s.handle, methods=["POST"]),
            Route("/v1/completions", s.handle, methods=["POST"]),
        ]
    )
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.started
    try:
        yield s, f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=5)
        sock.close()


def _cfg(url: str, **kw: Any) -> BenchConfig:
    kw.setdefault("timeout", 10)
    return BenchConfig(url=url, **kw)


def test_fixed_streaming_chat(stub: tuple[Stub, str]) -> None:
    s, url = stub
    done = []
    res = asyncio.run(
        run_fixed(_cfg(url, api_key="k"), 4, 10, prompt_len=8, max_tokens=5, on_done=done.append)
    )
    assert len(res.records) == 10 == len(s.received) == len(done)
    assert not res.stopped_early
    for r in res.records:
        assert r.ok and r.tokens_from_usage and r.output_tokens == len(CHUNKS)
        assert r.ttft is not None and r.e2e is not None and 0 < r.ttft < r.e2e
        assert len(r.itl) == len(CHUNKS) - 1
    body = s.received[0]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["max_tokens"] == 5 and len(body["messages"][0]["content"].split()) == 8
    assert s.headers[0] == "Bearer k"
    summary = summarize(res.records, res.duration_s)
    assert summary["succeeded"] == 10 and summary["ttft_s"]["p50"] < summary["e2e_s"]["p50"]


def test_fixed_completions_no_stream(stub: tuple[Stub, str]) -> None:
    s, url = stub
    res = asyncio.run(run_fixed(_cfg(url, endpoint="completions", stream=False), 2, 3, 4, 5))
    assert [r.ok for r in res.records] == [True] * 3
    assert all(r.ttft is None and r.e2e and r.output_tokens == len(CHUNKS) for r in res.records)
    assert "prompt" in s.received[0] and "stream" not in s.received[0]


def test_qa_history_grows(stub: tuple[Stub, str]) -> None:
    s, url = stub
    res = asyncio.run(
        run_qa(
            _cfg(url),
            users=3,
            rounds=3,
            qps=50.0,
            system_prompt_len=5,
            history_len=7,
            question_len=2,
            answer_len=4,
        )
    )
    assert len(res.records) == 9 == len(s.received)
    assert all(r.ok and 0 < r.ttft < r.e2e for r in res.records)
    by_user: dict[str, list[list[dict[str, str]]]] = {}
    for body in s.received:
        system = body["messages"][0]["content"]
        by_user.setdefault(system, []).append(body["messages"])
    assert len(by_user) == 3  # each user has its own history after the shared system prompt
    shared = {" ".join(k.split()[:5]) for k in by_user}
    assert len(shared) == 1
    for convo in by_user.values():
        assert [len(m) for m in convo] == [2, 4, 6]  # rounds of one user are sequential
        for prev, nxt in itertools.pairwise(convo):
            assert nxt[: len(prev)] == prev
            assert nxt[len(prev)] == {"role": "assistant", "content": "".join(CHUNKS)}
            assert nxt[-1]["role"] == "user"
    assert {r.round for r in res.records} == {0, 1, 2}


def test_errors_counted_not_raised(stub: tuple[Stub, str]) -> None:
    s, url = stub
    s.fail = {1: 429, 3: 500, 4: 429}
    res = asyncio.run(run_fixed(_cfg(url), 1, 6, 4, 5))
    summary = summarize(res.records, res.duration_s)
    assert summary["requests"] == 6 and summary["succeeded"] == 3
    assert summary["errors_by_status"] == {"429": 2, "500": 1}
    res = asyncio.run(run_fixed(_cfg("http://127.0.0.1:9", timeout=2), 1, 2, 4, 5))
    assert all(r.status.startswith("error:") for r in res.records)


def test_max_duration_stops(stub: tuple[Stub, str]) -> None:
    s, url = stub
    s.delay = 0.5  # each request streams for 2.5 s
    t = time.monotonic()
    res = asyncio.run(run_fixed(_cfg(url, max_duration=0.4), 2, 50, 4, 5))
    assert time.monotonic() - t < 2.0
    assert res.stopped_early and len(res.records) < 50


def test_trace_replay(stub: tuple[Stub, str], tmp_path) -> None:
    s, url = stub
    path = tmp_path / "t.jsonl"
    write_trace(
        path,
        [
            TraceRequest(0.0, "m1", "hello there", max_tokens=3),
            TraceRequest(0.05, "m2", None, tokens=[1, 2, 3], max_tokens=4),
            TraceRequest(0.1, "m3", None, blocks=[7, 9], block_size=16, prompt_tokens=40),
        ],
    )
    from app.lab.trace import block_token_ids, read_trace

    res = asyncio.run(run_trace(_cfg(url, endpoint="completions"), read_trace(path)))
    assert len(res.records) == 3 and all(r.ok for r in res.records)
    got = sorted(s.received, key=lambda b: b["model"])
    assert got[0]["prompt"] == "hello there" and got[1]["prompt"] == [1, 2, 3]
    # a captured blocks line: token ids made from its hashes, its prompt's length
    assert got[2]["prompt"] == list(block_token_ids([7, 9], 16, 40)) and len(got[2]["prompt"]) == 40
    assert [b["max_tokens"] for b in got] == [3, 4, 64]


def test_cli_writes_json_and_markdown(stub: tuple[Stub, str], tmp_path) -> None:
    s, url = stub
    s.fail = {0: 503}
    out, md = tmp_path / "r.json", tmp_path / "r.md"
    args = ["bench", "--url", url, "--concurrency", "2", "--requests", "5", "--prompt-len", "3"]
    result = CliRunner().invoke(cli, [*args, "--json", str(out), "--markdown", str(md)])
    assert result.exit_code == 0, result.output
    doc = json.loads(out.read_text())
    assert doc["config"]["mode"] == "fixed" and doc["config"]["requests"] == 5
    assert doc["summary"]["requests"] == 5 and doc["summary"]["errors_by_status"] == {"503": 1}
    assert len(doc["records"]) == 5
    assert "| TTFT |" in md.read_text()
    qa = ["bench", "--url", url, "--mode", "qa", "--users", "2", "--rounds", "2", "--qps", "100"]
    qa += ["--system-prompt-len", "3", "--history-len", "3", "--answer-len", "2"]
    result = CliRunner().invoke(cli, [*qa, "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["summary"]["succeeded"] == 4
