"""The ingress as a Ray Serve deployment: HTTP through `app.ingress.asgi`, Python through handle
methods. With tenants' quotas, every replica shares the application's quota ledger (a named Ray
actor, `app.tenants.ledger`): see `Ingress.__init__`. Each replica also runs a batch worker
(`app.batches.worker`) while `batches` is enabled."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, Mapping
from typing import Any

from pydantic import ValidationError
from ray import serve

from app.batches import BatchWorker
from app.config import load_config
from app.engines.items import Endpoint
from app.errors import OpenAIError, validation_message
from app.ingress.asgi import create_app
from app.ingress.auth import ANONYMOUS, KeyStore
from app.ingress.gateway import EngineHandle, Gateway
from app.ingress.protocol import ChatCompletionRequest, CompletionRequest, SamplingRequest
from app.internal_token import internal_token
from app.tenants.ledger import ActorLedger, ledger_name

logger = logging.getLogger("vrstack.ingress")
ROUTERS_READY_S = 30.0
LEDGER_READY_S = 10.0  # how long a starting replica waits for its first slices of the quotas
LEDGER_CLOSE_S = 2.0  # how long a stopping replica tries to give its slices back
_REQUESTS: dict[Endpoint, type[SamplingRequest]] = {
    "completions": CompletionRequest,
    "chat": ChatCompletionRequest,
}


@serve.deployment
@serve.ingress()
class Ingress:
    """OpenAI-compatible front door for every model of one stack.

    HTTP requests are relayed to the engine replicas' own ports (`app.ingress.gateway`). Python
    callers use the handle methods (`completions`, `chat`, and their `_stream` variants) with
    OpenAI request bodies as dicts; they get the same checks as HTTP. Without `api_key` they
    take the per-key limits of anonymous callers (handle callers are trusted); with one, its
    tenant's models, output bounds, quotas and priority (or its own per-key limits), as over
    HTTP, and an unknown key is a 401.
    """

    async def __init__(self, config: dict[str, Any], engines: Mapping[str, EngineHandle]) -> None:
        app_name = serve.get_replica_context().app_name
        token = await internal_token(app_name)
        self.gateway = Gateway(load_config(config), engines, token=token)
        # Not `self.app`: Serve's ASGI wrapper has a read-only `app` property (the app
        # `__serve_build_asgi_app__` returns, once Serve has built it).
        self._asgi = create_app(self.gateway)
        self._ledger_task: asyncio.Task | None = None
        await self._share_quotas(app_name)
        capture = self._asgi.capture  # every replica's records in the application's store
        self._capture_task = capture.share_with(app_name) if capture is not None else None
        # Ready (for HAProxy and the proxy) once the routers know the engine replicas.
        await self.gateway.wait_for_routers(ROUTERS_READY_S)
        # The models' tokenizers, for counting prompt tokens (the estimate until they come).
        self.gateway.fetch_tokenizers()
        # Batch requests, run here as the engines' lowest-priority work (`batches` enabled).
        store, settings = self._asgi.batches, self.gateway.config.batches
        worker = BatchWorker(self.gateway, store, settings) if store is not None else None
        self._batch_task = asyncio.get_running_loop().create_task(worker.run()) if worker else None

    async def _share_quotas(self, app_name: str) -> None:
        """Tenants' quotas in the application's ledger actor, got or created by whichever
        replica comes first (detached: it outlives a redeploy's replicas, and ends itself once
        no replica has called it for a minute): tenants' quotas, per-key limits and the usage
        figures `GET /usage` adds up. Without tenants or per-key limits, nothing is shared."""
        limiter = self.gateway.limiter
        if not (limiter.wants_ledger or limiter.tenants):
            return
        limiter.share(ActorLedger(ledger_name(app_name)))
        try:  # the first slices before taking requests; without them, 429 until it answers
            await asyncio.wait_for(limiter.sync(), LEDGER_READY_S)
        except TimeoutError:
            logger.warning("the quota ledger did not answer within %.0f s", LEDGER_READY_S)
        self._ledger_task = asyncio.get_running_loop().create_task(limiter.run())

    async def __serve_build_asgi_app__(self) -> Any:
        return self._asgi

    async def __del__(self) -> None:
        self.gateway.stop_fetching()
        if (task := getattr(self, "_ledger_task", None)) is not None:
            task.cancel()
            with contextlib.suppress(Exception):  # give the slices back: best effort
                await asyncio.wait_for(self.gateway.limiter.close(), LEDGER_CLOSE_S)
        if (batches := getattr(self, "_batch_task", None)) is not None:
            batches.cancel()  # requests it runs are handed out again by the store's lease
        if (flushing := getattr(self, "_capture_task", None)) is not None:
            flushing.cancel()
            await self._asgi.capture.close()  # the last records: best effort
        await self.gateway.relay.close()
        if self.gateway.tracing is not None:  # the spans not sent yet
            await asyncio.to_thread(self.gateway.tracing.shutdown)

    async def completions(self, body: dict[str, Any], api_key: str | None = None) -> dict[str, Any]:
        """A completion (non-streaming); raises OpenAIError on bad input."""
        return await handle_call(self.gateway, "completions", body, self.app.keys, api_key)

    async def chat(self, body: dict[str, Any], api_key: str | None = None) -> dict[str, Any]:
        """A chat completion (non-streaming); raises OpenAIError on bad input."""
        return await handle_call(self.gateway, "chat", body, self.app.keys, api_key)

    async def completions_stream(
        self, body: dict[str, Any], api_key: str | None = None
    ) -> AsyncGenerator[dict[str, Any], None]:
        """Completion chunks as dicts (call with `handle.options(stream=True)`)."""
        keys = self.app.keys
        async for chunk in handle_stream(self.gateway, "completions", body, keys, api_key):
            yield chunk

    async def chat_stream(
        self, body: dict[str, Any], api_key: str | None = None
    ) -> AsyncGenerator[dict[str, Any], None]:
        """Chat completion chunks as dicts (call with `handle.options(stream=True)`)."""
        async for chunk in handle_stream(self.gateway, "chat", body, self.app.keys, api_key):
            yield chunk


def caller_of(keys: KeyStore | None, api_key: str | None) -> tuple[str, str | None]:
    """A handle caller's key id and tenant: anonymous without a key; a 401 for an unknown one."""
    if api_key is None or keys is None:
        return ANONYMOUS, None
    key_id = keys.identify(api_key)
    if key_id is None:
        raise OpenAIError(401, "invalid API key", code="invalid_api_key")
    return key_id, keys.tenant_of(key_id)


async def handle_call(
    gateway: Gateway,
    endpoint: Endpoint,
    body: dict[str, Any],
    keys: KeyStore | None = None,
    api_key: str | None = None,
) -> dict:
    """A handle call's answer: HTTP's checks, then the caller's limits (`caller_of`)."""
    request = _parse(endpoint, body, stream=False)
    key_id, tenant = caller_of(keys, api_key)
    lease = gateway.admit(key_id, request, tenant)
    try:
        answer = await gateway.call(endpoint, request, tenant)
    except OpenAIError:
        lease.settle(0)  # refused or failed: not charged
        raise
    finally:
        lease.release()
    lease.settle_usage(answer.get("usage"))
    return answer


async def handle_stream(
    gateway: Gateway,
    endpoint: Endpoint,
    body: dict[str, Any],
    keys: KeyStore | None = None,
    api_key: str | None = None,
) -> AsyncGenerator[dict[str, Any], None]:
    """A streaming handle call's chunks, with the checks and limits of `handle_call`."""
    request = _parse(endpoint, body)
    key_id, tenant = caller_of(keys, api_key)
    lease = gateway.admit(key_id, request, tenant)
    started = False
    try:
        async for chunk in gateway.stream(endpoint, request, tenant):
            started = True
            if chunk.get("usage"):  # the last chunk, with stream_options.include_usage
                lease.settle_usage(chunk["usage"])
            yield chunk
    except OpenAIError:
        if not started:
            lease.settle(0)  # refused or failed before answering: not charged
        raise
    finally:
        lease.release()


def _parse(endpoint: Endpoint, body: dict[str, Any], *, stream: bool = True) -> SamplingRequest:
    try:
        return _REQUESTS[endpoint].model_validate({**body, "stream": stream})
    except ValidationError as exc:
        message, param = validation_message(exc)
        raise OpenAIError(400, message, param=param) from None
