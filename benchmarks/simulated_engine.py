"""The simulated engine deployment: a simulator standing in for an engine replica, with no model.

`SimulatedEngine` is the one Serve deployment that load, fault and overhead runs put where engine
replicas go, so they can drive the real proxy, ingress and request router at a scale no CPU engine
reaches. It speaks both engine interfaces:
- ours: `serve_openai(endpoint, body, *, route=...)` yielding `app.engines.items` plain items,
  and `record_routing_stats` with its in-flight count, as `app.engines.llm_server.EngineServer`;
- stock Ray Serve LLM's: `completions(request, raw_request_info)` / `chat(...)` taking its OpenAI
  request models and yielding SSE strings (lists of them when batched) or response models, as
  `LLMServer` does behind stock `OpenAiIngress`.
Its answers come from one of two sources:
- generated here: `tokens` chunks `delay_s / tokens` apart (`tokens=None`: the request's
  `max_tokens`), one item each, or gathered every `batch_ms` ms by stock's own `Batcher` as
  `LLMServer` gathers them, one item a batch;
- forwarded (`pool` given): each replica takes the URL of its Serve replica rank from a
  `BackendPool` and relays every call over HTTP to that replica of the lab's HTTP simulator
  (`benchmarks.sim_server`), so Ray's fronts and the peer routers face the same simulated replicas.
Its answers tell the ingress their usage as an engine replica's do (`app.engines.http_server`).
Streams asked for their token ids (`return_token_ids`, as the ingress asks for the streams it
can migrate) carry them, their text made by a toy model (`benchmarks.toy_model`); a prompt of
token ids asking for them (a migrated stream's continuation) gets `max_tokens` tokens. Tests may
shape one request with a `simulate` object in its body (`{"delay_s": 25, "tokens": 100}`
overrides the deployment's), and stop a replica's engine as vLLM's engine core dies inside a
live replica (`fail_engine`, or `"engine_dies_after_s"` in a request's `simulate`: the engine of
the replica answering it): streams in progress end with vLLM's error event and [DONE], new
requests fail with vLLM's text, and the health check raises (so Serve replaces the replica).
It is never built from a serve config: tests and benchmarks bind it.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import httpx
import ray
from ray import serve

from app.engines.autoscaling import RELAYED
from app.engines.http_server import DRAIN_S, Answer, EngineApp, EngineHttpServer, usage_pair
from app.engines.items import Endpoint, EngineItem, error_item
from app.engines.request_meter import RequestMeter, wants_usage
from app.internal_token import internal_token
from app.ray_internals import openai_request_models
from benchmarks.toy_model import next_token, prompt_ids, word

PATHS: dict[str, str] = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}
KEEPALIVE_LIMITS = httpx.Limits(max_connections=1000, keepalive_expiry=1.0)
Piece = str | list[str] | EngineItem  # an SSE text, a batch of them, or a plain item
ENGINE_DEAD = "EngineCore encountered an issue. See stack trace (above) for the root cause."
_DEAD_EVENT = "data: " + json.dumps(
    {"error": {"message": ENGINE_DEAD, "type": "InternalServerError", "param": None, "code": 500}}
)  # what vLLM's stream says when its engine core dies


@ray.remote(num_cpus=0)
class BackendPool:
    """Hands each forwarding replica the URL of its rank and records who holds which URL."""

    def __init__(self, urls: list[str]) -> None:
        self._urls = list(urls)
        self._holders: dict[int, str] = {}  # rank -> replica id

    def claim(self, rank: int, replica_id: str) -> str:
        if not 0 <= rank < len(self._urls):
            raise ValueError(f"replica rank {rank} outside 0..{len(self._urls) - 1}")
        self._holders[rank] = replica_id
        return self._urls[rank]

    def bindings(self) -> dict[str, str]:
        """URL -> replica id, for every URL claimed so far."""
        return {self._urls[rank]: rid for rank, rid in sorted(self._holders.items())}


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000)
class SimulatedEngine:
    """A simulated engine replica (see the module docstring)."""

    async def __init__(
        self,
        delay_s: float = 0.01,
        tokens: int | None = 4,
        batch_ms: float = 0,
        pool: Any = None,
        *,
        ray_llm: bool = False,
    ) -> None:
        """`ray_llm`: import Ray Serve LLM's request models now, as an `LLMServer` replica has
        them loaded before its first request."""
        if ray_llm:
            openai_request_models()
        self._delay_s, self._tokens, self._batch_ms = delay_s, tokens, batch_ms
        self._in_flight = 0  # handle calls
        self._running = 0  # answers being generated (vLLM's running requests)
        self._engine_dead = False
        self._meter = RequestMeter()
        ctx = serve.get_replica_context()
        self._port = EngineApp(self, await internal_token(ctx.app_name))
        self._http = EngineHttpServer(self._port)
        self.url: str | None = None  # the simulator replica this one forwards to
        if pool is not None:
            self.url = await pool.claim.remote(ctx.rank.rank, ctx.replica_id.unique_id)
            self._client = httpx.AsyncClient(timeout=600.0, limits=KEEPALIVE_LIMITS)
        else:
            await self._http.start()

    def record_replica_metadata(self) -> dict[str, Any]:
        """Where the ingress relays HTTP requests: this replica's port, or (forwarding) the
        simulator replica itself, as a peer router would reach it."""
        return {"url": self.url or self._http.url}

    async def record_routing_stats(self) -> dict[str, Any]:
        return {
            **self._port.stats(),
            "in_flight": self._in_flight + self._port.in_flight,
            "running": self._running,
            "requests": self._meter.snapshot(),
        }

    async def check_health(self) -> None:
        if self._engine_dead:
            raise RuntimeError(ENGINE_DEAD)

    async def fail_engine(self) -> str:
        """Stop this replica's engine for good (as vLLM's engine core dying); the replica id."""
        self._engine_dead = True
        return serve.get_replica_context().replica_id.unique_id

    async def record_autoscaling_stats(self) -> dict[str, float]:
        return {RELAYED: self._port.in_flight}

    async def __del__(self) -> None:
        await self._http.stop(DRAIN_S)

    async def answer(self, endpoint: Endpoint, body: dict[str, Any]) -> Answer:
        """An HTTP request's answer, made here (`app.engines.http_server.Backend`)."""
        if endpoint not in PATHS:
            return Answer.error(404, f"the simulated engine does not serve {endpoint}")
        if not body.get("stream"):
            piece = await anext(self._plain(body))
            return Answer.json(piece["body"], usage=usage_pair(piece["body"].get("usage")))
        delay_s, tokens = self._shape(body)
        events = self._engine(_sse_stream(body, delay_s, tokens, usage=True))
        batches = self._batches(events)
        return Answer(stream=self._meter.sse(endpoint, batches, keep_usage=wants_usage(body)))

    async def serve_openai(
        self, endpoint: Endpoint, body: dict[str, Any]
    ) -> AsyncGenerator[EngineItem, None]:
        """Our handle interface: `{"body"}`, or `{"chunk"}` per stream chunk."""
        if endpoint not in PATHS:
            yield error_item(404, f"the simulated engine does not serve {endpoint}")
            return
        async for piece in self._pieces(endpoint, body):
            if isinstance(piece, dict):
                yield piece
                continue
            for event in [piece] if isinstance(piece, str) else piece:
                if not event.startswith("data: [DONE]"):
                    yield {"chunk": json.loads(event.removeprefix("data: "))}

    async def completions(self, request: Any, raw_request_info: Any = None) -> AsyncGenerator:
        """Stock Ray Serve LLM's engine interface (as `LLMServer.completions`)."""
        async for out in self._as_ray_llm("completions", request):
            yield out

    async def chat(self, request: Any, raw_request_info: Any = None) -> AsyncGenerator:
        """Stock Ray Serve LLM's engine interface (as `LLMServer.chat`)."""
        async for out in self._as_ray_llm("chat", request):
            yield out

    async def _as_ray_llm(self, endpoint: Endpoint, request: Any) -> AsyncGenerator:
        oai = openai_request_models()
        body = request.model_dump(mode="json", exclude_unset=True)
        async for piece in self._pieces(endpoint, body):
            if not isinstance(piece, dict):
                yield piece
            elif "body" in piece:
                kind = oai.ChatCompletionResponse if endpoint == "chat" else oai.CompletionResponse
                yield kind.model_validate(piece["body"])
            else:
                info = {**piece["error"], "code": piece["status"]}
                yield oai.ErrorResponse(error=oai.ErrorInfo(**info))

    async def _pieces(self, endpoint: Endpoint, body: dict[str, Any]) -> AsyncIterator[Piece]:
        """Handle calls' answers: SSE strings (lists of them when batched) or plain items."""
        self._in_flight += 1
        try:
            if self.url:
                source = self._forward(PATHS[endpoint], body)
            elif body.get("stream"):
                delay_s, tokens = self._shape(body)
                events = _sse_stream(body, delay_s, tokens, usage=wants_usage(body))
                source = self._batches(self._engine(events))
            else:
                source = self._plain(body)
            async for piece in source:
                yield piece
        finally:
            self._in_flight -= 1

    def _shape(self, body: dict[str, Any]) -> tuple[float, int]:
        """(delay_s, tokens) of one answer: the body's `simulate` object, else the
        deployment's (`tokens=None`: the request's max_tokens); the engine's death scheduled
        if the object asks for it."""
        shape = body.get("simulate") if isinstance(body.get("simulate"), dict) else {}
        if "engine_dies_after_s" in shape:
            asyncio.get_running_loop().call_later(
                float(shape["engine_dies_after_s"]), setattr, self, "_engine_dead", True
            )
        tokens = shape.get("tokens") or self._tokens
        tokens = tokens or int(body.get("max_tokens") or body.get("max_completion_tokens") or 16)
        prompt, limit = body.get("prompt"), body.get("max_tokens")
        if body.get("return_token_ids") and isinstance(prompt, list) and isinstance(limit, int):
            tokens = limit  # token ids for token ids: a migrated stream's continuation
        return float(shape.get("delay_s", self._delay_s)), max(1, int(tokens))

    async def _plain(self, body: dict[str, Any]) -> AsyncIterator[Piece]:
        delay_s, tokens = self._shape(body)
        self._running += 1
        try:
            await asyncio.sleep(delay_s)
        finally:
            self._running -= 1
        if self._engine_dead:
            raise RuntimeError(ENGINE_DEAD)  # as vLLM's EngineDeadError
        rid, created = f"sim-{uuid.uuid4().hex[:12]}", int(time.time())
        yield {"body": _completion(rid, created, body, "sim " * tokens, tokens)}

    async def _engine(self, events: AsyncIterator[str]) -> AsyncIterator[str]:
        """A stream's events as the engine makes them (counted as running): once the engine is
        dead, vLLM's error event and [DONE] instead."""
        self._running += 1
        try:
            async for event in events:
                if self._engine_dead:
                    yield _DEAD_EVENT + "\n\n"
                    yield "data: [DONE]\n\n"
                    return
                yield event
        finally:
            self._running -= 1

    def _batches(self, stream: AsyncIterator[str]) -> AsyncIterator[list[str]]:
        """The stream in lists, gathered every `batch_ms` ms by stock's own `Batcher` as
        `LLMServer` gathers them, or one string a list."""
        from ray.llm._internal.serve.utils.batcher import Batcher

        return Batcher(stream, interval_ms=self._batch_ms).stream()

    async def _forward(self, path: str, body: dict[str, Any]) -> AsyncIterator[Piece]:
        """POST to the simulator; whole SSE events as they arrive, or the JSON answer."""
        async with self._client.stream("POST", f"{self.url}{path}", json=body) as reply:
            if reply.status_code != 200:
                data = json.loads(await reply.aread() or b"{}")
                message = (data.get("error") or {}).get("message") or "simulator error"
                yield error_item(reply.status_code, message)
                return
            if not body.get("stream"):
                yield {"body": json.loads(await reply.aread())}
                return
            pending = ""
            async for text in reply.aiter_text():
                pending += text
                cut = pending.rfind("\n\n") + 2
                if cut >= 2:
                    yield pending[:cut]
                    pending = pending[cut:]
            if pending.strip():
                yield pending + "\n\n"


async def _sse_stream(
    body: dict[str, Any], delay_s: float, tokens: int, *, usage: bool
) -> AsyncIterator[str]:
    """`tokens` SSE text chunks `delay_s / tokens` apart, a usage chunk with `usage`, then
    [DONE]. With `return_token_ids` (vLLM's option) the chunks carry token ids and their text
    comes from the toy model (`benchmarks.toy_model`), as the ingress asks for streams it can
    migrate."""
    created, rid = int(time.time()), f"sim-{uuid.uuid4().hex[:12]}"
    with_ids = bool(body.get("return_token_ids"))
    prompt = prompt_ids(body) if with_ids else []
    sequence = list(prompt)
    for i in range(tokens):
        await asyncio.sleep(delay_s / tokens)
        if not with_ids:
            chunk = _completion(rid, created, body, "sim ", tokens, usage=False)
            yield f"data: {json.dumps(chunk)}\n\n"
            continue
        token = next_token(sequence)
        sequence.append(token)
        chunk = _completion(rid, created, body, word(token), tokens, usage=False)
        chunk["choices"][0] |= {
            "finish_reason": "length" if i == tokens - 1 else None,
            "prompt_token_ids": prompt if i == 0 else None,
            "token_ids": [token],
        }
        yield f"data: {json.dumps(chunk)}\n\n"
    if usage:
        final = {**_completion(rid, created, body, "", tokens), "choices": []}
        yield f"data: {json.dumps(final)}\n\n"
    yield "data: [DONE]\n\n"


def _completion(
    rid: str, created: int, body: dict[str, Any], text: str, tokens: int, usage: bool = True
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": rid,
        "object": "text_completion",
        "created": created,
        "model": body.get("model"),
        "choices": [{"index": 0, "text": text, "finish_reason": "length", "logprobs": None}],
    }
    if usage:
        out["usage"] = {"prompt_tokens": 1, "completion_tokens": tokens, "total_tokens": tokens + 1}
    return out


def simulated_stack(config: Any, *, engine_options: dict | None = None, **engine_args: Any) -> Any:
    """The stack of `config` as `app.builder` builds it (the engine deployments' options from
    `app.engines.llm_config.deployment_config`), with `SimulatedEngine` replicas (`engine_args`)
    where each model's engine replicas go; `engine_options` are merged into those options."""
    from app.builder import ingress_app
    from app.engines.llm_config import deployment_config, deployment_name

    engines = {}
    for spec in config.models:
        options = deployment_config(spec, config.router)
        for key, value in (engine_options or {}).items():
            merge = isinstance(value, dict) and isinstance(options.get(key), dict)
            options[key] = {**options[key], **value} if merge else value
        engines[spec.name] = SimulatedEngine.options(name=deployment_name(spec), **options).bind(
            **engine_args
        )
    return ingress_app(config, engines)
