"""An engine double for in-process tests: it stands in for vLLM (not for our code).

`EngineDouble` answers like an engine replica (`app.engines.http_server.Backend`) and can be told
to fail, hang or break a stream midway, or lose its engine as vLLM does when its engine core
process dies (`engine_dead`: from the start; `engine_dies`: after a stream's first chunk;
`engine_dead_once`: one replica's engine is dead, the other's lives; `engine_dies_once`: one
replica's engine dies mid-stream, the other's lives). With `model=True` it streams as vLLM does
with `return_token_ids`, from a deterministic toy model (`benchmarks.toy_model`): a
continuation from a prompt of token ids makes what an uninterrupted run makes. `Stack` serves
doubles on loopback ports with the real engine port app and server (`EngineApp`,
`EngineHttpServer`), and hands the ingress each model's replicas through the real request
router (`StackRequestRouter.route`) over fake Serve replica records, standing in for Serve's
replica discovery. A "dead" replica is a port nothing listens on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import AsyncIterator, Collection, Iterator
from types import SimpleNamespace
from typing import Any

from app.engines import router_registry
from app.engines.http_server import (
    Answer,
    EngineApp,
    EngineHttpServer,
    Usage,
    usage_comment,
    usage_pair,
)
from app.engines.router import Routed, StackRequestRouter
from app.routing import RequestView
from benchmarks.processes import free_port
from benchmarks.toy_model import next_token, prompt_ids, word

TOKEN = "test-token"
MODES = ("ok", "error400", "error500", "hang", "die", "die_once", "slow", "break_stream",
         "hang_stream", "engine_dead", "engine_dies", "engine_dead_once",
         "engine_dies_once")  # fmt: skip
VLLM_OOPS = "CUDA error: an illegal memory access was encountered"
VLLM_DEAD = "EngineCore encountered an issue. See stack trace (above) for the root cause."
_DEAD_EVENT = json.dumps({"error": {"message": VLLM_DEAD, "type": "InternalServerError",
                                    "param": None, "code": 500}})  # fmt: skip


class EngineDouble:
    """One model's engine, answering every replica of it."""

    def __init__(
        self,
        name: str,
        *,
        mode: str = "ok",
        tokens: int = 3,
        model: bool = False,
        fail_at: int = 1,
        token_delay: float = 0.0,
        first_delay: float = 0.0,
    ) -> None:
        assert mode in MODES, mode
        self.name = name
        self.mode = mode
        self.tokens = tokens
        self.model = model  # stream as vLLM with return_token_ids, from `next_token`
        self.fail_at = fail_at  # the chunk a failing stream (break, hang, engine dies) fails at
        self.token_delay = token_delay  # seconds before each of a model stream's tokens
        self.first_delay = first_delay  # seconds before a model stream's first chunk (prefill)
        self.calls: list[tuple[str, dict]] = []
        self.cancelled = 0
        self.engine_dead = mode == "engine_dead"
        # set: answers carry it as an engine replica's do (JSON: a header, streams: a comment)
        self.usage: dict[str, int] | None = None
        self.events: list[dict[str, Any]] | None = None  # set: a stream's data events, as given
        self.running = 0  # answers being made now
        self.most_running = 0

    async def check_health(self) -> None:
        if self.engine_dead:
            raise RuntimeError(VLLM_DEAD)

    async def answer(self, endpoint: str, body: dict[str, Any]) -> Answer:
        self.calls.append((endpoint, body))
        if self.engine_dead:  # as vLLM: a stream says so in-band, an answer raises
            if body.get("stream"):
                return Answer(stream=_chunks([f"data: {_DEAD_EVENT}\n\n", "data: [DONE]\n\n"]))
            raise RuntimeError(VLLM_DEAD)
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        try:
            if self.mode == "hang":
                await asyncio.sleep(3600)
            if self.mode == "slow":
                await asyncio.sleep(0.3)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.running -= 1
        if self.mode == "error400":
            return Answer.error(400, "prompt too long", param="prompt")
        if self.mode == "error500":
            error = {"message": VLLM_OOPS, "type": "InternalServerError", "code": 500}
            return Answer.json({"error": error}, 500)
        if not body.get("stream"):
            answer = {"object": endpoint, "model": body["model"], "echo": body, "created": 1}
            if self.usage is None:
                return Answer.json(answer)
            return Answer.json({**answer, "usage": self.usage}, usage=usage_pair(self.usage))
        if self.model:
            return Answer(stream=self._model_stream(endpoint, body))
        return Answer(stream=self._stream())

    async def _failure(self, i: int) -> list[bytes] | None:
        """The chunks that end a stream failing at its chunk `i` (None: it does not fail
        there), each as vLLM yields it."""
        if i != self.fail_at:
            return None
        if self.mode == "break_stream":
            raise RuntimeError("engine died mid-stream")
        if self.mode == "hang_stream":
            await asyncio.sleep(3600)
        if self.mode != "engine_dies":
            return None
        self.engine_dead = True
        return [f"data: {_DEAD_EVENT}\n\n".encode(), b"data: [DONE]\n\n"]  # no usage after it

    async def _model_stream(self, endpoint: str, body: dict[str, Any]) -> AsyncIterator[bytes]:
        """vLLM's stream with `return_token_ids` (of a chat or a completion), from `next_token`."""
        prompt = prompt_ids(body)
        count = body.get("max_tokens") or body.get("max_completion_tokens") or self.tokens
        chat, sequence = endpoint == "chat", list(prompt)
        head = {"id": f"{endpoint}-double", "created": 7, "model": body["model"],
                "object": "chat.completion.chunk" if chat else "text_completion"}  # fmt: skip
        try:
            if self.first_delay:
                await asyncio.sleep(self.first_delay)
            if chat:
                role = {"index": 0, "delta": {"role": "assistant", "content": ""},
                        "logprobs": None, "finish_reason": None}  # fmt: skip
                yield _data({**head, "choices": [role], "prompt_token_ids": prompt})
            for i in range(count):
                if (end := await self._failure(i)) is not None:
                    for chunk in end:
                        yield chunk
                    return
                if self.token_delay:
                    await asyncio.sleep(self.token_delay)
                token = next_token(sequence)
                sequence.append(token)
                reason = "length" if i == count - 1 else None
                choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": reason,
                                          "stop_reason": None}  # fmt: skip
                if chat:
                    choice = {**choice, "delta": {"content": word(token)}, "token_ids": [token]}
                else:
                    first = prompt if i == 0 else None
                    choice = {**choice, "text": word(token), "prompt_token_ids": first,
                              "token_ids": [token]}  # fmt: skip
                yield _data({**head, "choices": [choice]})
            options = body.get("stream_options") or {}
            usage = {"prompt_tokens": len(prompt), "completion_tokens": count,
                     "total_tokens": len(prompt) + count}  # fmt: skip
            if options.get("include_usage"):
                yield _data({**head, "choices": [], "usage": usage})
            yield usage_comment(Usage(len(prompt), count)) + b"data: [DONE]\n\n"
        except (asyncio.CancelledError, GeneratorExit):
            self.cancelled += 1
            raise

    async def _stream(self) -> AsyncIterator[bytes]:
        try:
            for i in range(self.tokens):
                if (end := await self._failure(i)) is not None:
                    for chunk in end:
                        yield chunk
                    return
                yield f'data: {{"choices": [{{"index": 0, "text": "t{i}"}}]}}\n\n'.encode()
            for event in self.events or []:
                yield f"data: {json.dumps(event)}\n\n".encode()
            usage = usage_pair(self.usage)
            yield (b"" if usage is None else usage_comment(usage)) + b"data: [DONE]\n\n"
        except (asyncio.CancelledError, GeneratorExit):
            self.cancelled += 1
            raise


def _data(chunk: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"


async def _chunks(events: list[str]) -> AsyncIterator[bytes]:
    for event in events:
        yield event.encode()


class HandleDouble:
    """An engine deployment's Serve handle (the part the gateway uses: `serve_openai`) over an
    engine double: JSON answers as `{"body"}` items, errors as `{"status", "error"}`, streams'
    data events as `{"chunk"}` items."""

    def __init__(self, engine: EngineDouble) -> None:
        self.engine = engine

    def options(self, **_: Any) -> HandleDouble:
        return self

    def remote(self, endpoint: str, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        async def items() -> AsyncIterator[dict[str, Any]]:
            answer = await self.engine.answer(endpoint, body)
            if answer.stream is None:
                data = json.loads(answer.body)
                yield {"body": data} if answer.status == 200 else {"status": answer.status, **data}
                return
            text = b"".join([chunk async for chunk in answer.stream]).decode()
            for event in events(text):
                if event != "[DONE]":
                    yield {"chunk": event}

        return items()


class LoopbackRoutes:
    """A model's replicas as the ingress sees them: the real router over fake Serve records."""

    def __init__(self, model: str, urls: list[str], policy: str = "scored") -> None:
        self.router = StackRequestRouter.__new__(StackRequestRouter)  # no Serve set-up needed
        self.router.initialize_state(policy=policy, model=model)
        self.replicas = [
            SimpleNamespace(
                replica_id=SimpleNamespace(unique_id=f"{model}-r{i + 1}"),
                replica_metadata={"url": url},
                routing_stats={},
                max_ongoing_requests=64,
            )
            for i, url in enumerate(urls)
        ]
        self.routed: list[Routed] = []
        self.finished: list[Routed] = []
        self.replicas_known = True

    def route(
        self, view: RequestView, exclude: Collection[str] = (), *, slots: float | None = None
    ) -> Routed | None:
        routed = self.router.route(view, exclude, candidates=self.replicas, slots=slots)
        if routed is not None:
            self.routed.append(routed)
        return routed

    def first_token(self, routed: Routed) -> None:
        self.router.first_token(routed)

    def finish(self, routed: Routed) -> None:
        self.finished.append(routed)
        self.router.finish(routed)

    def replica_count(self) -> int:
        return len(self.replicas)


class Stack:
    """Engine doubles on loopback ports for each model of a config, and their routes."""

    def __init__(self, engines: dict[str, EngineDouble], ready: dict[str, int] | None = None):
        self.engines = engines
        self.ready = ready or {}
        self.routes: dict[str, LoopbackRoutes] = {}
        self.apps: list[EngineApp] = []  # each replica's port app
        self._servers: list[EngineHttpServer] = []

    async def start(self) -> Stack:
        for name, engine in self.engines.items():
            url = await self._serve(engine)
            dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
            if engine.mode == "engine_dead_once":  # a replica whose engine is gone, then ours
                dead = await self._serve(EngineDouble(name, mode="engine_dead"))
            if engine.mode == "engine_dies_once":  # a replica whose engine dies mid-stream
                dies = EngineDouble(name, mode="engine_dies", model=engine.model,
                                    fail_at=engine.fail_at, tokens=engine.tokens)  # fmt: skip
                dead = await self._serve(dies)
            once = {"die_once", "engine_dead_once", "engine_dies_once"}
            urls = (
                [dead] * 4
                if engine.mode == "die"
                else [dead, url]
                if engine.mode in once
                else [url]
            )
            urls = urls[: self.ready.get(name, len(urls))]
            self.routes[name] = routes = LoopbackRoutes(name, urls)
            if engine.mode in once:  # the dead replica looks least loaded: chosen first
                routes.replicas[1].routing_stats = {"in_flight": 5}
        return self

    async def _serve(self, engine: EngineDouble) -> str:
        self.apps.append(app := EngineApp(engine, TOKEN))
        server = EngineHttpServer(app, host="127.0.0.1")
        self._servers.append(server)
        return await server.start()

    def get(self, model: str) -> LoopbackRoutes | None:
        return self.routes.get(model)

    async def stop(self) -> None:
        for server in self._servers:
            await server.stop(drain_s=0.1)
        router_registry.forget_all()


@contextlib.contextmanager
def serving(stack: Stack) -> Iterator[Stack]:
    """The stack's engine ports served from a thread of their own (for synchronous callers)."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(stack.start(), loop).result(30)
    try:
        yield stack
    finally:
        asyncio.run_coroutine_threadsafe(stack.stop(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def events(text: str) -> list[Any]:
    """The data payloads of an SSE text (JSON decoded, `[DONE]` as is)."""
    out = []
    for line in text.splitlines():
        if line.startswith("data: "):
            payload = line.removeprefix("data: ")
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out
