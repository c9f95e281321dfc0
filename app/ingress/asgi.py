"""The ingress's ASGI app: the OpenAI POST endpoints answered in one pass, the rest by FastAPI.

Every request gets an id (`x-request-id`), which every answer carries. The POST endpoints
(completions, chat, embeddings, score, rerank, tokenize, detokenize; `app.ingress.routes`) take
the hot path, with no framework between the server and the relay: API key, body limit, JSON
(nesting bounded), the request model's checks, the model and its limits (a tenant's too), then
the per-key or the tenant's quotas (settled from the answer's usage, JSON or stream, as its
engine counted it: `app.ingress.relay`), with tenants the model's fair admission gate
(`_admitted`), then `Gateway.relay_http`, cancelled when the client leaves (the app watches for
it itself, whatever Ray's proxy was told); each answer is counted in the metrics with what the
path already holds, and recorded for a trace when `capture` is on. Everything else (models,
health, version, metrics, usage, capture, status, the Responses API (`/v1/responses`, served
over the engines' chat: `app.ingress.routes.responses`), files and batches (`/v1/files`,
`/v1/batches`: `app.ingress.routes.batches`), OpenAPI, unknown routes) is FastAPI's, behind the
same API keys. Every error is OpenAI-shaped.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Coroutine
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import ValidationError
from pydantic.json_schema import models_json_schema
from starlette.types import Message, Receive, Scope, Send

from app import __version__
from app.batches import BatchStore
from app.capture import Recorder
from app.engines.http_server import Usage, route_path, unless_disconnected
from app.errors import OpenAIError, public_message, validation_message
from app.ingress.auth import AuthMiddleware, KeyStore
from app.ingress.error_handlers import install_error_handlers
from app.ingress.gateway import Exchange, Gateway, admission_cost
from app.ingress.limits import Lease, QuotaError
from app.ingress.middleware import (
    json_object,
    read_body,
    request_id_of,
    send_error,
    with_request_id,
    without_body,
)
from app.ingress.protocol import OpenAIRequest
from app.ingress.routes import batches as batches_routes
from app.ingress.routes import capture as capture_routes
from app.ingress.routes import chat, completions, embeddings, health, models, score, tokenize
from app.ingress.routes import files as files_routes
from app.ingress.routes import metrics as metrics_routes
from app.ingress.routes import responses as responses_routes
from app.ingress.routes import usage as usage_routes
from app.ingress.routes.common import PostRoute
from app.observability.metrics import CLIENT_LEFT, NO_TENANT, StackMetrics
from app.observability.receipts import log_receipt
from app.shared_actor import Local, Shared, shared
from app.tenants import AdmissionGate, QueueFull, WaitExpired

logger = logging.getLogger("vrstack.ingress")
POST_ROUTES = (completions.ROUTE, chat.ROUTE, embeddings.ROUTE, score.SCORE, score.RERANK,
               tokenize.TOKENIZE, tokenize.DETOKENIZE)  # fmt: skip
QUEUE_EXPIRED_RETRY_AFTER_S = 1  # as the stack's other overload answers
RECEIPT_HEADER = b"x-route-receipt"  # a request's ask for its route receipt


class StackApp:
    """An OpenAI-compatible ASGI app serving `gateway`'s models."""

    def __init__(self, gateway: Gateway) -> None:
        config = gateway.config
        self.gateway = gateway
        self.metrics = StackMetrics(config)
        self.keys = KeyStore.from_settings(config.auth, config.tenants)
        self.max_body_bytes = config.limits.max_body_bytes
        # With tenants, answers show no routing replica or reason (a cross-tenant prefix oracle).
        self.private_routes = bool(config.tenants)
        self.gated = bool(gateway.gates)  # tenants: fair admission in front of each model
        key = config.router.session_key
        self.session_header = key.lower().encode() if key else None
        self.receipts = config.router.receipts  # every decision carries a route receipt
        self.posts = {path: route for route in POST_ROUTES for path in route.paths}
        self.api = _fastapi(gateway, self.metrics, self.keys)
        self.capture: Recorder | None = self.api.state.capture  # `capture` configured
        self.batches: Local | Shared | None = self.api.state.batches  # `batches` enabled

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.api(scope, receive, send)
            return
        request_id = request_id_of(scope)
        send = with_request_id(send, request_id)
        route = self.posts.get(route_path(scope))
        if route is None and scope["method"] == "HEAD":  # load balancers' checks: GET, no body
            await self.api({**scope, "method": "GET"}, receive, without_body(send))
        elif route is None:
            await self.api(scope, receive, send)
        elif scope["method"] != "POST":
            message = f"method {scope['method']} is not allowed on {scope['path']}"
            await send_error(send, OpenAIError(405, message, code="method_not_allowed"))
        else:
            await self._post(route, scope, receive, send, request_id)

    async def _post(
        self, route: PostRoute, scope: Scope, receive: Receive, send: Send, request_id: str
    ) -> None:
        started = time.perf_counter()
        endpoint = route.endpoint
        gauge = self.metrics.in_flight.labels(endpoint)
        gauge.inc()
        answer = _Answer(send)
        tracing = self.gateway.tracing
        trace = (
            tracing.start("POST", scope["path"], scope["headers"], request_id) if tracing else None
        )
        exchange = Exchange(trace=trace)
        record = None  # this request's capture record, when recorded
        model, stream, tenant, lease, quota = None, False, None, None, None
        try:
            key_id, request = await self._request(route, scope, receive)
            model, stream = request.model, getattr(request, "stream", False)
            tenant = self.keys.tenant_of(key_id)
            if trace is not None:
                trace.request(model, tenant, stream)
            lease = await self.gateway.admit_shared(key_id, request, tenant)
            if self.capture is not None:
                session = self._session(scope)
                record = self.capture.begin(endpoint, request, tenant, session, started)
            gate = self.gateway.gate_of(endpoint, request) if self.gated else None
            try:
                relay = self.gateway.relay_http(
                    endpoint,
                    request,
                    send=answer,
                    request_id=request_id,
                    session=self._session(scope),
                    exchange=exchange,
                    private=self.private_routes,
                    tenant=tenant,
                    receipt=self._receipt(scope),
                )
                if gate is not None:  # tenants configured: wait for a slot in fair order
                    relay = self._admitted(gate, tenant, request, relay, answer, exchange)
                del request  # the relay alone decides how long the request is kept
                # Ours, whatever Ray's proxy was told (x-request-disconnect-disabled).
                await unless_disconnected(relay, receive)
            except OpenAIError:
                lease.settle(0)  # failed before answering: not charged
                raise
            finally:
                _settle(lease, answer, exchange.usage)
                lease.release()
        except OpenAIError as exc:
            quota = exc.quota if isinstance(exc, QuotaError) else None
            await answer.error(exc)
        except Exception:
            logger.exception("unhandled error in request %s", request_id)
            message = f"internal error; quote request id {request_id} when reporting it"
            await answer.error(OpenAIError(500, message))
        finally:
            gauge.dec()
            status = answer.status or CLIENT_LEFT
            streamed = answer.status == 200 and stream and exchange.first_byte_at is not None
            self.metrics.finish(
                model,
                endpoint,
                status,
                time.perf_counter() - started,
                ttft_s=exchange.first_byte_at - started if streamed else None,
                decision=exchange.decision,
                migration=exchange.stream.outcome if exchange.stream is not None else None,
                usage=exchange.usage,
            )
            if exchange.decision is not None and exchange.decision.receipt is not None:
                log_receipt(request_id, exchange.decision.receipt, exchange.usage)
            if self.metrics.tenants:
                self.metrics.tenant_finish(tenant, status, exchange.usage, lease, quota)
            if trace is not None:
                trace.end(status, exchange.usage)
            if record is not None and self.capture is not None:
                self.capture.end(record, exchange)

    async def _admitted(
        self,
        gate: AdmissionGate,
        tenant: str | None,
        request: OpenAIRequest,
        relay: Coroutine[Any, Any, None],
        answer: _Answer,
        exchange: Exchange,
    ) -> None:
        """`relay` once `gate` grants a slot (priority class, then the tenants' weighted token
        service), the slot settled with the answer's usage: 429 when the tenant's queue is
        full, 503 when no slot came within `admission.max_wait_s`."""
        trace = exchange.trace
        label = tenant or NO_TENANT
        priority = self.gateway.priority_of(tenant)
        cost = admission_cost(gate.queue, request)
        started = time.perf_counter()
        waiting = trace.admission(label, priority) if trace is not None else None
        try:
            async with gate.admit(label, priority, cost) as slot:
                self.metrics.tenant_queued(label, time.perf_counter() - started)
                if waiting is not None:
                    waiting.end()
                exchange.slot, exchange.priority = slot, slot.ticket.priority
                try:
                    await relay
                except OpenAIError:
                    slot.settle(0, 0)  # failed before answering: no service
                    raise
                finally:
                    if exchange.preemptions:
                        self.metrics.tenant_preempted(label, exchange.preemptions)
                    if exchange.usage is not None:
                        slot.settle(exchange.usage.prompt, exchange.usage.completion)
                    elif answer.status is not None and answer.status >= 400:
                        slot.settle(0, 0)
        except (QueueFull, WaitExpired) as exc:
            reason = "queue_full" if isinstance(exc, QueueFull) else "expired"
            self.metrics.tenant_queue_rejected(label, reason)
            raise _queue_refusal(exc, label) from None
        finally:
            relay.close()  # not started when refused or cancelled while waiting
            if waiting is not None and waiting.is_recording():
                waiting.end()  # refused or cancelled while waiting (ending twice is a no-op)

    async def _request(
        self, route: PostRoute, scope: Scope, receive: Receive
    ) -> tuple[str, OpenAIRequest]:
        """The caller's key id and the checked request: API key, body size, JSON, the request
        model's fields."""
        key_id = self.keys.authenticate(scope["headers"])
        data = json_object(await read_body(scope, receive, self.max_body_bytes))
        try:
            return key_id, route.request.model_validate(data)
        except ValidationError as exc:
            message, param = validation_message(exc)
            raise OpenAIError(400, message, param=param) from None

    def _receipt(self, scope: Scope) -> bool:
        """Whether the decision carries a route receipt: `router.receipts`, or the request's
        `x-route-receipt: 1` (`true`, `yes`) header unless tenants share the stack (their
        receipts go to the logs only, so only `router.receipts` makes them)."""
        if self.receipts:
            return True
        if self.private_routes:
            return False
        value = dict(scope["headers"]).get(RECEIPT_HEADER)
        return value is not None and value.strip().lower() in (b"1", b"true", b"yes")

    def _session(self, scope: Scope) -> str | None:
        if self.session_header is None:
            return None
        value = dict(scope["headers"]).get(self.session_header)
        return value.decode("latin-1") if value else None


class _Answer:
    """The client's `send`, remembering the answer's status; errors only before it starts.

    An engine's JSON 4xx answer keeps its message but not pydantic's internals (vLLM quotes its
    validation errors); the engine replicas keep their own failures' text out of 5xx answers
    (`app.engines.http_server`)."""

    def __init__(self, send: Send) -> None:
        self._send = send
        self._held: Message | None = None  # an engine 4xx's head, until its body is in
        self._body = b""
        self.status: int | None = None

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
            if 400 <= self.status < 500 and not _is_stream(message):
                self._held = message
                return
        elif self._held is not None:
            self._body += message.get("body", b"")
            if not message.get("more_body", False):
                await send_error(self._send, self._refusal(self._held))
            return
        await self._send(message)

    async def error(self, error: OpenAIError) -> None:
        if self.status is None:
            self.status = error.status
            await send_error(self._send, error)

    def _refusal(self, head: Message) -> OpenAIError:
        """The engine's 4xx answer, its message fit for the client."""
        try:
            error = OpenAIError.from_body(head["status"], json.loads(self._body))
        except (ValueError, AttributeError):  # not OpenAI's shape: nothing of it is shown
            error = OpenAIError(head["status"], "")
        error.message = public_message(error.message) or "the engine refused the request"
        error.headers = {
            k.decode(): v.decode() for k, v in head["headers"] if k.startswith(b"x-route-")
        }
        return error


def _settle(lease: Lease, answer: _Answer, usage: Usage | None) -> None:
    """Charge the tokens the answer's `usage` reports (a JSON answer's or a stream's); nothing
    for a refusal or a failure; else (a client that left, a stream that broke off, no usage
    from the engine) what was reserved."""
    if usage is not None:
        lease.settle_tokens(usage.prompt, usage.completion)
    elif answer.status is not None and answer.status >= 400:
        lease.settle(0)


def _queue_refusal(exc: QueueFull | WaitExpired, tenant: str) -> OpenAIError:
    """A full tenant queue: 429, as a quota (the tenant's own backlog); an expired wait: 503,
    as any overload (the model's engines are full, whoever fills them)."""
    who = "requests without a tenant" if tenant == NO_TENANT else f"tenant {tenant!r}"
    if isinstance(exc, QueueFull):
        seconds = exc.rejected.retry_after
        return OpenAIError(
            429,
            f"too many requests waiting for the model for {who}; retry after {seconds} s",
            code="rate_limit_exceeded",
            headers={"retry-after": str(seconds)},
        )
    return OpenAIError(
        503,
        f"the model is overloaded: no engine slot for {who} within the queue's wait; retry later",
        code="overloaded",
        headers={"retry-after": str(QUEUE_EXPIRED_RETRY_AFTER_S)},
    )


def _is_stream(start: Message) -> bool:
    return dict(start.get("headers", [])).get(b"content-type", b"").startswith(b"text/event")


def create_app(gateway: Gateway) -> StackApp:
    """An OpenAI-compatible ASGI app serving `gateway`'s models."""
    return StackApp(gateway)


def _fastapi(gateway: Gateway, metrics: StackMetrics, keys: KeyStore) -> FastAPI:
    """The GET endpoints, OpenAPI and error handlers, behind the API keys."""
    app = FastAPI(
        title="vllm-ray-stack",
        version=__version__,
        description="OpenAI-compatible API over vLLM engines on Ray Serve.",
    )
    app.state.gateway = gateway
    app.state.metrics = metrics
    app.state.capture = Recorder.of(gateway.config)
    batches = gateway.config.batches
    app.state.batches = (
        shared("batches", BatchStore, batches.max_stored_bytes) if batches.enabled else None
    )
    routers = (models, health, metrics_routes, usage_routes, capture_routes, responses_routes,
               files_routes, batches_routes)  # fmt: skip
    for module in routers:
        app.include_router(module.router)
    install_error_handlers(app)
    protect = gateway.config.auth.protect_metrics
    app.add_middleware(AuthMiddleware, keys=keys, protect_metrics=protect)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema of the GET endpoints, with the POST endpoints added from `POST_ROUTES`."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    schema = get_openapi(
        title=app.title, version=app.version, description=app.description, routes=app.routes
    )
    requests = [(route.request, "validation") for route in POST_ROUTES]
    refs, defs = models_json_schema(requests, ref_template="#/components/schemas/{model}")
    schema.setdefault("components", {}).setdefault("schemas", {}).update(defs.get("$defs", {}))
    for route in POST_ROUTES:
        body = {"content": {"application/json": {"schema": refs[(route.request, "validation")]}}}
        operation = {
            "summary": route.summary,
            "requestBody": {**body, "required": True},
            "responses": {"200": {"description": "The engine's answer (JSON, or SSE)."}},
        }
        for path in route.paths:
            schema["paths"][path] = {"post": operation}
    app.openapi_schema = schema
    return schema
