"""The engine deployment: Ray Serve LLM's `LLMServer` (one vLLM engine) with our two doors.

- HTTP: the replica serves its OpenAI endpoints on a port of its own (`app.engines.http_server`);
  the ingress relays clients' requests there and their answers' bytes back. This is the path of
  every HTTP request.
- Handle: `serve_openai(endpoint, body)` answers Python callers of the stack's handle API with
  plain items (`app.engines.items`): the engine's JSON answer, or each chunk of a stream as a
  dict.
Both parse the body into Ray Serve LLM's (vLLM's) request objects here, so the ingress never
imports vLLM, and both call `LLMServer`'s public methods. Streams are not batched (`LLMConfig`
`stream_batching_interval_ms: 0`): each engine chunk leaves as it comes.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from pydantic import BaseModel, ValidationError
from ray import serve
from ray.serve.llm import LLMServer

from app.config.lora import LoraSettings
from app.engines import embedded
from app.engines.autoscaling import RELAYED
from app.engines.http_server import (
    DRAIN_S,
    Answer,
    EngineApp,
    EngineHttpServer,
    Usage,
    engine_host,
    usage_pair,
)
from app.engines.items import Endpoint, EngineItem
from app.engines.kv_publisher import METADATA_KEY, KvPublisher
from app.engines.lora import AdapterLoadError, AdapterSlots
from app.engines.request_meter import RequestMeter, wants_usage
from app.engines.stat_logger import EngineStats
from app.errors import error_body, validation_message
from app.internal_token import internal_token
from app.ray_internals import (
    NoTelemetryStart,
    add_stat_logger,
    download_folder,
    enable_tokenization,
    engine_block_size,
    engine_tokenizer,
    load_lora,
    openai_request_models,
    scoring_service,
    unload_lora,
)

logger = logging.getLogger("vrstack.engine")


def _request_class(endpoint: Endpoint, body: dict[str, Any]) -> type[BaseModel]:
    if endpoint in ("score", "rerank"):
        return _scoring_class(endpoint, body)
    oai = openai_request_models()
    chat_shaped = "messages" in body
    return {
        "completions": oai.CompletionRequest,
        "chat": oai.ChatCompletionRequest,
        "embeddings": oai.EmbeddingChatRequest if chat_shaped else oai.EmbeddingCompletionRequest,
        "tokenize": oai.TokenizeChatRequest if chat_shaped else oai.TokenizeCompletionRequest,
        "detokenize": oai.DetokenizeRequest,
    }[endpoint]


def _scoring_class(endpoint: Endpoint, body: dict[str, Any]) -> type[BaseModel]:
    """vLLM's rerank request, or the score request of the pair of fields the body gives (Ray
    Serve LLM's own takes `text_1`/`text_2` only)."""
    from vllm.entrypoints.pooling.scoring import protocol

    if endpoint == "rerank":
        return protocol.RerankRequest
    if "queries" in body and "items" in body:
        return protocol.ScoreQueriesItemsRequest
    if "queries" in body:
        return protocol.ScoreQueriesDocumentsRequest
    return protocol.ScoreDataRequest if "data_1" in body else protocol.ScoreTextRequest


class EngineServer(NoTelemetryStart, LLMServer):
    """An `LLMServer` replica that answers the ingress on its own HTTP port and Python callers
    through `serve_openai`."""

    _adapters: AdapterSlots | None = None  # a model with LoRA adapters: the ones it holds

    async def __init__(
        self,
        llm_config: Any,
        *,
        embedded_model: str | None = None,
        kv_events: bool = False,
        lora: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        """`kv_events`: the engine publishes its KV cache events for the router
        (`app.engines.kv_publisher`); `lora`: the model's `LoraSettings`, whose adapters the
        replica loads when requests name them (`app.engines.lora`)."""
        self._engine_stats = EngineStats()
        self._meter = RequestMeter()
        token = await internal_token(serve.get_replica_context().app_name)
        self._port = EngineApp(self, token)
        self._http = EngineHttpServer(self._port)
        if embedded_model:  # convert on this node, once; the engine then loads the folder
            await asyncio.to_thread(embedded.prepare, embedded_model)
        self._kv = KvPublisher.on(engine_host()) if kv_events else None
        if self._kv is not None:
            llm_config.update_engine_kwargs(kv_events_config=self._kv.engine_config())
        self._adapters = None if lora is None else AdapterSlots(
            LoraSettings.model_validate(lora),
            load=lambda name, path: load_lora(self.engine, name, path),
            unload=lambda name: unload_lora(self.engine, name),
            download=download_folder,
            cache=embedded.cache_root() / "lora",
        )  # fmt: skip
        await super().__init__(llm_config, **kwargs)

    async def start(self) -> None:
        await super().start()
        enable_tokenization(self.engine)
        if not add_stat_logger(self.engine, self._engine_stats):
            logger.warning("vLLM engine has no stat loggers; engine state metrics stay at 0")
        await self._http.start()

    def record_replica_metadata(self) -> dict[str, Any]:
        """The replica's HTTP port, for the ingress's request router; where its engine
        publishes its KV cache events, when it does."""
        metadata: dict[str, Any] = {"url": self._http.url}
        if self._kv is not None:
            metadata[METADATA_KEY] = self._kv.metadata(engine_block_size(self.engine))
        return metadata

    async def record_routing_stats(self) -> dict[str, Any]:
        """Stats for the request router and the ingress's metrics: the replica's answers in
        progress and whether its engine lives (`EngineApp.stats`), its engine's running/queued
        requests, KV-cache usage and prefix-cache hits (`app.engines.stat_logger`), its
        per-token figures (`app.engines.request_meter`), and the LoRA adapters it holds."""
        return {
            **await super().record_routing_stats(),
            **self._port.stats(),
            **self._engine_stats.as_dict(),
            "requests": self._meter.snapshot(),
            **(self._adapters.stats() if self._adapters is not None else {}),
        }

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """The answers in progress on this replica's port, for the autoscaling policy
        (`app.engines.autoscaling`), which Serve's own count does not see."""
        return {RELAYED: self._port.in_flight}

    async def tokenizer_spec(self) -> dict[str, Any]:
        """The engine's tokenizer, for the ingress's prompt-token counts
        (`app.ingress.prompt_tokens`, on any node): vLLM's fast tokenizer as `tokenizers` JSON,
        the chat template vLLM renders chats with, and the special tokens a template names."""
        tokenizer, template = await engine_tokenizer(self.engine)
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise NotImplementedError(f"{type(tokenizer).__name__} is not a fast tokenizer")
        template = template or getattr(tokenizer, "chat_template", None)
        names = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token")
        special = {n: v for n in names if isinstance(v := getattr(tokenizer, n, None), str)}
        return {
            "tokenizer": backend.to_str(),
            "chat_template": template if isinstance(template, str) else None,
            "special_tokens": special,
        }

    async def rerank(self, request: Any) -> AsyncIterator[Any]:
        """vLLM's rerank, which `LLMServer` does not serve: its scoring service asked as
        `LLMServer.score` asks it (one answer: the response, or an error response)."""
        return _reranked(scoring_service(self.engine), request)

    async def __del__(self) -> None:
        """Stop taking HTTP requests, let those in progress finish, then stop the engine."""
        await self._http.stop(DRAIN_S)
        await super().__del__()

    # -- answers ----------------------------------------------------------------------------
    async def answer(self, endpoint: Endpoint, body: dict[str, Any]) -> Answer:
        """One HTTP request's answer (`app.engines.http_server.Backend`)."""
        keep_usage = wants_usage(body)
        request, items = await self._run(endpoint, body)
        if isinstance(request, Answer):
            return request
        first = await anext(items, None)
        if isinstance(first, list) and first and not isinstance(first[0], str):
            first = first[0]  # refused before streaming (vLLM's error, batched as a stream's)
        if isinstance(first, list):  # a stream: batches of SSE strings
            chunks = self._meter.sse(endpoint, _chained(first, items), keep_usage=keep_usage)
            return Answer(stream=chunks)
        if first is None:
            return Answer.error(500, "the engine returned no answer", code="engine_error")
        status, data = _plain(first)
        if status != 200:
            return Answer.json(data, status)
        self._meter.usage(endpoint, data.get("usage"))
        return Answer.json(data, status, _usage_of(endpoint, body, data))

    async def serve_openai(
        self, endpoint: Endpoint, body: dict[str, Any]
    ) -> AsyncGenerator[EngineItem, None]:
        """One handle call's answer: `{"body": dict}`, or `{"chunk": dict}` per stream chunk;
        an error as `{"status", "error"}` (an engine failure as the HTTP port answers it)."""
        try:
            request, items = await self._run(endpoint, body)
            if isinstance(request, Answer):
                yield {"status": request.status, **json.loads(request.body)}
                return
            async for item in items:
                for piece in item if isinstance(item, list) else [item]:
                    if isinstance(piece, str):
                        if piece.startswith('data: {"error"'):
                            raise RuntimeError(piece)
                        if not piece.startswith("data: [DONE]"):
                            yield {"chunk": json.loads(piece.removeprefix("data: "))}
                        continue
                    status, data = _plain(piece)
                    if status >= 500:
                        raise RuntimeError(json.dumps(data))
                    yield {"body": data} if status == 200 else {"status": status, **data}
        except Exception as exc:
            failure = await self._port.failure(endpoint, "handle", exc)
            yield {"status": failure.status, **json.loads(failure.body)}

    async def _run(
        self, endpoint: Endpoint, body: dict[str, Any]
    ) -> tuple[Any, AsyncIterator[Any]]:
        """Parse the body and start the engine on it: (request, its answer's items), or (an
        error `Answer`, nothing) when the body is not a valid request."""
        if body.get("stream") is True:  # usage counted on every stream (see the meter)
            options = body.get("stream_options")
            options = options if isinstance(options, dict) else {}
            body = {**body, "stream_options": {**options, "include_usage": True}}
        try:
            request = _request_class(endpoint, body).model_validate(body)
        except ValidationError as exc:
            message, param = validation_message(exc)
            return Answer.error(400, message, param=param), _nothing()
        except ValueError as exc:
            return Answer.error(400, str(exc)), _nothing()
        if self._adapters is not None and (name := body.get("model")) in self._adapters:
            try:
                await self._adapters.use(name)
            except AdapterLoadError as exc:
                logger.warning("%s", exc)
                failed = Answer.error(503, str(exc), code="adapter_unavailable", ours=True)
                return failed, _nothing()
        return request, await getattr(self, endpoint)(request)


def _usage_of(endpoint: Endpoint, body: dict[str, Any], data: dict[str, Any]) -> Usage | None:
    """The tokens of a JSON answer, for the ingress: its `usage`; a tokenize answer's `count`
    as prompt tokens; a detokenize request's token ids."""
    if endpoint == "tokenize":
        count = data.get("count")
        return Usage(count, 0) if isinstance(count, int) else None
    if endpoint == "detokenize":
        tokens = body.get("tokens")
        return Usage(len(tokens), 0) if isinstance(tokens, list) else None
    return usage_pair(data.get("usage"))


async def _reranked(serving: Any, request: Any) -> AsyncIterator[Any]:
    """The answer of vLLM's scoring service (`serving`; None: the model cannot score) to a
    rerank request, as `LLMServer.score` gives a score request's."""
    from vllm.entrypoints.pooling.scoring.protocol import RerankResponse
    from vllm.entrypoints.serve.exception_handling.error_response import create_error_response
    from vllm.exceptions import VLLMClientError

    if serving is None:
        yield create_error_response(
            "This model does not support the 'score' task. "
            "The rerank endpoint is not available for this model."
        )
        return
    try:
        response = await serving(request, raw_request=None)
    except (ValueError, VLLMClientError) as exc:
        yield serving.create_error_response(exc)
        return
    yield RerankResponse.model_validate_json(response.body)


async def _nothing() -> AsyncIterator[Any]:
    return
    yield


async def _chained(first: list[str], rest: AsyncIterator[Any]) -> AsyncIterator[list[str]]:
    yield first
    async for batch in rest:
        yield batch


def _plain(item: Any) -> tuple[int, dict[str, Any]]:
    """(status, JSON body) of an engine response object or error."""
    data = item.model_dump(mode="json", exclude_none=False)
    if "error" in data and len(data) == 1:
        error = data["error"]
        code = error.get("code")
        status = code if isinstance(code, int) and 400 <= code < 600 else 500
        message = error.get("message") or "engine error"
        return status, error_body(status, message, param=error.get("param"))
    return 200, data
