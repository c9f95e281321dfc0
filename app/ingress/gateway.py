"""The ingress's core: resolve the model, apply limits, call its engine, shape the answer.

HTTP routes and Python handle calls both go through `Gateway`, so both get the same checks.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import AsyncIterator, Mapping
from typing import Any, Protocol

from app.config import ModelSpec, StackConfig
from app.engines import router_registry
from app.engines.items import Endpoint, EngineItem
from app.errors import OpenAIError, error_body
from app.ingress.limits import KeyLimiter, Lease
from app.ingress.protocol import OpenAIRequest, SamplingRequest
from app.ingress.readiness import Readiness
from app.routing import Decision

logger = logging.getLogger("vrstack.ingress")
DONE = "data: [DONE]\n\n"


class EngineHandle(Protocol):
    """The part of a Ray Serve `DeploymentHandle` the gateway uses."""

    def options(self, **kwargs: Any) -> Any: ...


class Gateway:
    """Model-aware front door for every engine deployment of one stack."""

    def __init__(
        self, config: StackConfig, engines: Mapping[str, EngineHandle], readiness: Readiness
    ) -> None:
        self.config = config
        self.readiness = readiness
        self.limiter = KeyLimiter(config.limits.per_key)
        self._handles = {
            name: handle.options(stream=True, method_name="serve_openai")
            for name, handle in engines.items()
        }

    # -- models -------------------------------------------------------------------------------
    def resolve(self, name: str) -> ModelSpec:
        """The model a name or alias refers to, or a 404 naming the available models."""
        spec = self.config.model(name)
        if spec is None:
            available = ", ".join(n for m in self.config.models for n in m.names)
            raise OpenAIError(
                404,
                f"model {name!r} does not exist; available models: {available}",
                param="model",
                code="model_not_found",
            )
        return spec

    def model_cards(self) -> list[dict[str, Any]]:
        """OpenAI model objects: every model and alias (`root` names the canonical model)."""
        return [
            {
                "id": name,
                "object": "model",
                "created": 0,
                "owned_by": "vllm-ray-stack",
                "root": spec.name,
                "parent": None if name == spec.name else spec.name,
                "max_model_len": spec.max_model_len,
            }
            for spec in self.config.models
            for name in spec.names
        ]

    # -- requests -----------------------------------------------------------------------------
    def admit(self, key_id: str, request: OpenAIRequest) -> Lease:
        """Per-key rate, token and concurrency limits (429 with Retry-After when over)."""
        tokens = request.estimated_tokens() if isinstance(request, SamplingRequest) else 1
        return self.limiter.acquire(key_id, tokens)

    def check_limits(self, request: OpenAIRequest) -> None:
        limits = self.config.limits
        if not isinstance(request, SamplingRequest):
            return
        if request.n > limits.max_n:
            raise OpenAIError(400, f"n={request.n} exceeds the limit of {limits.max_n}", param="n")
        tokens = request.output_tokens()
        if limits.max_tokens is not None and tokens is not None and tokens > limits.max_tokens:
            raise OpenAIError(
                400,
                f"max_tokens={tokens} exceeds the limit of {limits.max_tokens}",
                param="max_tokens",
            )

    async def open(
        self,
        endpoint: Endpoint,
        request: OpenAIRequest,
        *,
        session: str | None = None,
    ) -> EngineStream:
        """Check and send a request; the result has already received the engine's first item.

        `session` is the session id for session-aware routing. The request router writes its
        decision into the `route` dict sent beside the request (see `app.engines.router`).
        """
        spec = self.resolve(request.model)
        self.check_limits(request)
        await self.readiness.require(spec)
        handle = self._handles[spec.name]
        if session:
            handle = handle.options(session_id=session)
        body = request.engine_body(spec.name)
        retries = self.config.server.retries
        for attempt in range(retries + 1):
            route: dict[str, str] = {}
            stream = EngineStream(
                handle.remote(endpoint, body, route=route),
                timeout_s=self.config.server.request_timeout_s,
            )
            try:
                await stream.start()
            except OpenAIError as exc:  # nothing was sent yet: another replica may answer
                if exc.code != REPLICA_FAILED or attempt == retries:
                    raise
                await asyncio.sleep(backoff_s(attempt))
                continue
            request_id = route.pop("request_id", None)
            stream.decision = Decision(**route) if route else None
            if request_id:  # the first item is in: the policy's prefill estimate can drop it
                router_registry.first_token(spec.name, request_id)
            return stream
        raise AssertionError("unreachable")  # pragma: no cover

    async def call(self, endpoint: Endpoint, request: OpenAIRequest) -> dict[str, Any]:
        """A non-streaming request: the engine's whole JSON answer."""
        return (await self.open(endpoint, request)).body()


class EngineStream:
    """One engine call: the first item is awaited (with a timeout) before any byte is sent, so
    failures up to then become proper HTTP errors; later failures become an SSE error event."""

    def __init__(self, generator: Any, *, timeout_s: float) -> None:
        self._generator = generator
        self._timeout_s = timeout_s
        self.first: EngineItem = {}
        self.decision: Decision | None = None

    def body(self) -> dict[str, Any]:
        """The whole JSON answer of a non-streaming request."""
        if "body" not in self.first:
            self.cancel()
            raise OpenAIError(500, "the engine answered a non-streaming request with a stream")
        return self.first["body"]

    def route_headers(self) -> dict[str, str]:
        """`x-route-policy`, `x-route-replica` and `x-route-reason` of the routing decision."""
        if self.decision is None:
            return {}
        return {
            "x-route-policy": self.decision.policy,
            "x-route-replica": self.decision.replica_id,
            "x-route-reason": self.decision.reason,
        }

    async def start(self) -> None:
        try:
            self.first = await asyncio.wait_for(self._generator.__anext__(), self._timeout_s)
        except StopAsyncIteration:
            raise OpenAIError(500, "the engine returned no answer") from None
        except asyncio.TimeoutError:
            self.cancel()
            raise OpenAIError(
                504, f"the engine did not answer within {self._timeout_s:g} s", code="timeout"
            ) from None
        except OpenAIError:
            raise
        except Exception as exc:
            raise engine_failure(exc) from None
        if "error" in self.first:
            raise OpenAIError.from_body(self.first["status"], self.first)

    async def sse(self) -> AsyncIterator[str]:
        """The stream as SSE text; always ends with ``data: [DONE]``."""
        done = finished = False
        try:
            item: EngineItem | None = self.first
            while item is not None:
                text = _sse_text(item)
                done = done or DONE.strip() in text
                yield text
                item = await self._next()
            finished = True
        except Exception as exc:  # the stream already started: report in-band, then end it
            finished = True
            error = exc if isinstance(exc, OpenAIError) else engine_failure(exc)
            yield f"data: {json.dumps(error.body())}\n\n"
        finally:
            if not finished:  # the client went away: stop generating for it
                self.cancel()
        if not done:
            yield DONE

    async def _next(self) -> EngineItem | None:
        try:
            return await asyncio.wait_for(self._generator.__anext__(), self._timeout_s)
        except StopAsyncIteration:
            return None
        except asyncio.TimeoutError:
            self.cancel()
            raise OpenAIError(504, "the engine stopped answering mid-stream") from None

    def cancel(self) -> None:
        self._generator.cancel()


def _sse_text(item: EngineItem) -> str:
    if "sse" in item:
        return item["sse"]
    if "error" in item:
        return f"data: {json.dumps(error_body(item['status'], item['error']['message']))}\n\n"
    return f"data: {json.dumps(item['body'])}\n\n"


def backoff_s(attempt: int) -> float:
    """50 ms doubling per attempt, with jitter, at most 2 s."""
    return min(2.0, 0.05 * 2**attempt) * (0.5 + random.random())


REPLICA_FAILED = "replica_failed"


def engine_failure(exc: BaseException) -> OpenAIError:
    """Map a failed engine call to a client error without leaking internals."""
    name = type(exc).__name__
    logger.warning("engine call failed: %s: %s", name, exc)
    if name in {"BackPressureError", "DeploymentUnavailableError"}:
        return OpenAIError(
            503, "the model is overloaded; retry later", code="overloaded",
            headers={"retry-after": "1"},
        )  # fmt: skip
    if name in {"ActorDiedError", "RayActorError", "ActorUnavailableError"}:
        return OpenAIError(503, "the model's replica failed; retry", code=REPLICA_FAILED)
    if name in {"RequestCancelledError", "CancelledError", "TaskCancelledError"}:
        return OpenAIError(503, "the request was cancelled", code="cancelled")
    return OpenAIError(500, "the engine failed to answer", code="engine_error")
