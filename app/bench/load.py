"""Workload drivers of `vrstack bench`: OpenAI-API requests over httpx with precise timing.

Three drivers, each returning a `RunResult`:

- `run_fixed`: N workers send M requests of a fixed prompt length, back to back.
- `run_qa`: production-stack's multi-round QA; every user is a conversation (shared system
  prompt, own history) whose rounds are sequential, each round appending the answer and a new
  question; users start at Poisson arrivals at `qps`.
- `run_trace`: a JSONL trace (`app.lab.trace`) replayed at its timestamps.

A request never raises: a bad status, a broken stream or a transport error becomes a record whose
status names it. Text is made of 3-letter words plus a space, about one token each.
"""

from __future__ import annotations

import asyncio
import json
import random
import string
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx

from app.bench.summary import RequestRecord

_LETTERS = string.ascii_lowercase


@dataclass(slots=True)
class BenchConfig:
    """Connection and request options shared by all modes."""

    url: str = "http://127.0.0.1:8000"
    model: str = "default"
    api_key: str | None = None
    endpoint: str = "chat"  # chat | completions
    stream: bool = True
    timeout: float = 300.0
    max_duration: float | None = None
    seed: int = 0
    extra_body: dict[str, Any] = field(default_factory=dict)  # e.g. temperature, ignore_eos

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["api_key"] = "***" if self.api_key else None
        return out


@dataclass(slots=True)
class RunResult:
    records: list[RequestRecord]
    duration_s: float
    stopped_early: bool = False
    planned: int = 0


@dataclass(slots=True)
class _Run:
    """State of one run: the clock origin, the records and the progress callback."""

    cfg: BenchConfig
    client: httpx.AsyncClient
    on_done: Callable[[RequestRecord], None] | None
    t0: float = field(default_factory=time.perf_counter)
    records: list[RequestRecord] = field(default_factory=list)

    def now(self) -> float:
        return time.perf_counter() - self.t0

    async def send(
        self,
        messages: list[dict[str, str]] | None = None,
        prompt: str | list[int] | None = None,
        max_tokens: int = 64,
        model: str | None = None,
        user: str | None = None,
        rnd: int | None = None,
    ) -> tuple[RequestRecord, str]:
        """Send one request; record it; return the record and the generated text."""
        rec = RequestRecord(start=self.now(), user=user, round=rnd)
        body = build_body(self.cfg, messages, prompt, max_tokens, model)
        text = await send_request(self.client, self.cfg, body, rec)
        self.records.append(rec)
        if self.on_done is not None:
            self.on_done(rec)
        return rec, text


def words(rng: random.Random, n: int) -> str:
    """n random 3-letter words, each followed by a space (about n tokens)."""
    return "".join(
        rng.choice(_LETTERS) + rng.choice(_LETTERS) + rng.choice(_LETTERS) + " " for _ in range(n)
    )


def _render(messages: list[dict[str, str]]) -> str:
    return "".join(f"{m.get('role', 'user')}: {m.get('content', '')}\n" for m in messages)


def build_body(
    cfg: BenchConfig,
    messages: list[dict[str, str]] | None,
    prompt: str | list[int] | None,
    max_tokens: int,
    model: str | None = None,
) -> tuple[str, dict[str, Any]]:
    """The (path, JSON body) of a request for the configured endpoint."""
    body: dict[str, Any] = {"model": model or cfg.model, "max_tokens": max_tokens}
    if cfg.endpoint == "chat":
        if messages is None:
            content = prompt if isinstance(prompt, str) else " ".join(map(str, prompt or []))
            messages = [{"role": "user", "content": content}]
        body["messages"] = messages
        path = "/v1/chat/completions"
    else:
        body["prompt"] = _render(messages) if messages is not None else (prompt or "")
        path = "/v1/completions"
    if cfg.stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    body.update(cfg.extra_body)
    return path, body


def _chunk_text(obj: dict[str, Any]) -> str:
    text = ""
    for choice in obj.get("choices") or []:
        delta = choice.get("delta")
        piece = delta.get("content") if isinstance(delta, dict) else choice.get("text")
        if piece is None and isinstance(choice.get("message"), dict):
            piece = choice["message"].get("content")
        text += piece or ""
    return text


def _apply_usage(rec: RequestRecord, obj: dict[str, Any]) -> None:
    usage = obj.get("usage")
    if isinstance(usage, dict) and usage.get("completion_tokens") is not None:
        rec.output_tokens = int(usage["completion_tokens"])
        rec.tokens_from_usage = True
        if usage.get("prompt_tokens") is not None:
            rec.prompt_tokens = int(usage["prompt_tokens"])


async def send_request(
    client: httpx.AsyncClient,
    cfg: BenchConfig,
    request: tuple[str, dict[str, Any]],
    rec: RequestRecord,
) -> str:
    """Send one request, filling `rec` (status, latencies, tokens); return the text. Never raises
    except on cancellation."""
    path, body = request
    t_send = time.perf_counter()
    pieces: list[str] = []
    try:
        if cfg.stream:
            async with client.stream("POST", path, json=body) as resp:
                if resp.status_code != 200:
                    await resp.aread()
                    rec.status = str(resp.status_code)
                    return ""
                last: float | None = None
                chunks = 0
                async for line in resp.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    try:
                        obj = json.loads(data)
                    except ValueError:
                        rec.status = "bad_chunk"
                        continue
                    if not isinstance(obj, dict):
                        continue
                    if "error" in obj:
                        rec.status = "stream_error"
                    text = _chunk_text(obj)
                    if text:
                        now = time.perf_counter()
                        if last is None:
                            rec.ttft = now - t_send
                        else:
                            rec.itl.append(now - last)
                        last = now
                        chunks += 1
                        pieces.append(text)
                    _apply_usage(rec, obj)
                if not rec.tokens_from_usage:
                    rec.output_tokens = chunks
        else:
            resp = await client.post(path, json=body)
            if resp.status_code != 200:
                rec.status = str(resp.status_code)
                return ""
            try:
                obj = resp.json()
            except ValueError:
                rec.status = "bad_json"
                return ""
            text = _chunk_text(obj) if isinstance(obj, dict) else ""
            pieces.append(text)
            if isinstance(obj, dict):
                _apply_usage(rec, obj)
            if not rec.tokens_from_usage:
                rec.output_tokens = len(text.split())
    except httpx.TimeoutException:
        rec.status = "timeout"
    except httpx.HTTPError as exc:
        rec.status = f"error:{type(exc).__name__}"
    rec.e2e = time.perf_counter() - t_send
    return "".join(pieces)


def make_client(cfg: BenchConfig, concurrency: int = 100) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    limits = httpx.Limits(max_connections=max(concurrency, 1), max_keepalive_connections=None)
    return httpx.AsyncClient(
        base_url=cfg.url.rstrip("/"),
        headers=headers,
        timeout=httpx.Timeout(cfg.timeout),
        limits=limits,
    )


async def _drive(
    cfg: BenchConfig,
    on_done: Callable[[RequestRecord], None] | None,
    concurrency: int,
    planned: int,
    body: Callable[[_Run], list[Any]],
    client: httpx.AsyncClient | None = None,
) -> RunResult:
    """Run the coroutines `body(run)` makes, stopping them all at `cfg.max_duration`."""
    own = client is None
    client = client or make_client(cfg, concurrency)
    run = _Run(cfg, client, on_done)
    tasks = [asyncio.ensure_future(c) for c in body(run)]
    stopped = False
    try:
        if tasks:
            _done, pending = await asyncio.wait(tasks, timeout=cfg.max_duration)
            if pending:
                stopped = True
                for t in pending:
                    t.cancel()
                await asyncio.gather(*pending, return_exceptions=True)
            for t in _done:
                if t.exception() is not None:
                    raise t.exception()
    finally:
        if own:
            await client.aclose()
    return RunResult(run.records, run.now(), stopped, planned)


async def run_fixed(
    cfg: BenchConfig,
    concurrency: int,
    requests: int,
    prompt_len: int,
    max_tokens: int,
    on_done: Callable[[RequestRecord], None] | None = None,
) -> RunResult:
    """`concurrency` workers send `requests` requests of `prompt_len` random words in total."""
    rng = random.Random(cfg.seed)
    prompts = [words(rng, prompt_len) for _ in range(requests)]
    queue = iter(range(requests))

    async def worker(run: _Run) -> None:
        for i in queue:
            await run.send(prompt=prompts[i], max_tokens=max_tokens)

    return await _drive(
        cfg, on_done, concurrency, requests, lambda run: [worker(run) for _ in range(concurrency)]
    )


async def run_qa(
    cfg: BenchConfig,
    users: int,
    rounds: int,
    qps: float,
    system_prompt_len: int,
    history_len: int,
    question_len: int,
    answer_len: int,
    on_done: Callable[[RequestRecord], None] | None = None,
) -> RunResult:
    """Multi-round QA: user u starts at the u-th Poisson arrival at `qps`; its first prompt is
    the shared system prompt, its own history and a question; every later round appends the
    answer received (or `answer_len` filler words when the request failed) and a new question."""
    rng = random.Random(cfg.seed)
    system = words(rng, system_prompt_len)
    starts, t = [], 0.0
    convos: list[list[dict[str, str]]] = []
    questions: list[list[str]] = []
    fillers: list[list[str]] = []
    for _ in range(users):
        starts.append(t)
        t += rng.expovariate(qps) if qps > 0 else 0.0
        history = words(rng, history_len)
        convos.append([{"role": "system", "content": system + history}])
        questions.append([words(rng, question_len) for _ in range(rounds)])
        fillers.append([words(rng, answer_len) for _ in range(rounds)])

    async def user(run: _Run, u: int) -> None:
        await asyncio.sleep(max(0.0, starts[u] - run.now()))
        messages = convos[u]
        for r in range(rounds):
            messages.append({"role": "user", "content": questions[u][r]})
            rec, text = await run.send(
                messages=list(messages), max_tokens=answer_len, user=f"user-{u}", rnd=r
            )
            messages.append({"role": "assistant", "content": text if rec.ok else fillers[u][r]})

    return await _drive(
        cfg, on_done, users, users * rounds, lambda run: [user(run, u) for u in range(users)]
    )


async def run_trace(
    cfg: BenchConfig,
    requests: list[Any],
    on_done: Callable[[RequestRecord], None] | None = None,
    model_override: bool = False,
) -> RunResult:
    """Replay `app.lab.trace.TraceRequest`s at their timestamps (relative to the first).
    The trace's model is used unless `model_override`."""
    t_first = min((r.t for r in requests), default=0.0)

    async def one(run: _Run, req: Any) -> None:
        await asyncio.sleep(max(0.0, req.t - t_first - run.now()))
        prompt = req.replay_prompt()  # a blocks line's as token ids from its hashes
        model = cfg.model if model_override else req.model
        await run.send(prompt=prompt, max_tokens=req.max_tokens, model=model, user=req.session)

    return await _drive(
        cfg, on_done, 256, len(requests), lambda run: [one(run, r) for r in requests]
    )
