"""POST /v1/responses, GET and DELETE /v1/responses/{id}, GET /v1/responses/{id}/input_items
(and their unprefixed twins): OpenAI's Responses API, served as chat completions on the
engines (`app.responses`; docs/responses.md).

Stored responses (`store: true`, the default) live in the application's response store, shared
by every ingress replica, so `previous_response_id` and `GET` work whichever replica answers. A
stored response belongs to its caller's tenant (or, without tenants, to its API key): to anyone
else it does not exist. Admission is every POST's: the model, the tenant's rules, then the
per-key or the tenant's quotas, settled with the answer's usage.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Annotated, Any, Literal, TypeVar

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError

from app.errors import OpenAIError, validation_message
from app.ingress.gateway import Gateway, engine_model
from app.ingress.limits import Lease, QuotaError
from app.ingress.middleware import json_object, read_body
from app.ingress.protocol import ChatCompletionRequest
from app.ingress.routes.common import GatewayDep, caller_of
from app.observability.metrics import CLIENT_LEFT, StackMetrics
from app.responses import ResponsesRequest, shared_store
from app.responses.convert import (
    chat_request,
    finished,
    from_chat,
    input_items,
)
from app.responses.events import MEDIA_TYPE, ResponseEvents
from app.shared_actor import Local, Shared

router = APIRouter(tags=["responses"])
logger = logging.getLogger("vrstack.ingress")
ENDPOINT = "responses"  # the metrics' endpoint label
T = TypeVar("T")
OUTPUT_PARAMS = {"max_tokens": "max_output_tokens", "max_completion_tokens": "max_output_tokens"}


def _store(request: Request, gateway: Gateway) -> Local | Shared:
    """The application's response store (made on first use); 404 when `responses` is off."""
    settings = gateway.config.responses
    if not settings.enabled:
        raise OpenAIError(
            404, "/v1/responses is off: see `responses` in the stack's config",
            code="responses_disabled",
        )  # fmt: skip
    state = request.app.state
    store = getattr(state, "responses_store", None)
    if store is None:
        store = state.responses_store = shared_store(settings.max_stored, settings.ttl_s)
    return store


def _unreachable(exc: Exception) -> OpenAIError:
    logger.warning("responses: the store cannot be reached: %r", exc)
    return OpenAIError.unreachable("response store", "response_store_unavailable")


def _not_found(response_id: str) -> OpenAIError:
    return OpenAIError(
        404, f"Response with id {response_id!r} not found.", code="response_not_found"
    )


def _renamed(error: OpenAIError) -> OpenAIError:
    """An error about the chat request, naming the Responses parameter."""
    if error.param in OUTPUT_PARAMS:
        error.message = error.message.replace(error.param, OUTPUT_PARAMS[error.param])
        error.param = OUTPUT_PARAMS[error.param]
    return error


@router.post("/v1/responses")
@router.post("/responses", include_in_schema=False)
async def create_response(request: Request, gateway: GatewayDep) -> Response:
    """A model response to `input` (after the stored conversation of `previous_response_id`);
    `stream: true` answers with Responses server-sent events. Stored unless `store: false`."""
    started = time.perf_counter()
    metrics: StackMetrics = request.app.state.metrics
    gauge = metrics.in_flight.labels(ENDPOINT)
    gauge.inc()
    status, model, tenant, lease, quota = CLIENT_LEFT, None, None, None, None
    usage: tuple[int, int] | None = None
    streaming = False
    try:
        caller = caller_of(request)
        key_id, tenant, owner = caller.key_id, caller.tenant, caller.owner
        store = _store(request, gateway)
        body = await read_body(request.scope, request.receive, gateway.config.limits.max_body_bytes)
        asked = _checked(ResponsesRequest.model_validate, json_object(body))
        model = asked.model
        history: list[dict[str, Any]] = []
        if asked.previous_response_id is not None:
            history = await _conversation(store, asked.previous_response_id, owner)
        items = input_items(asked)
        chat = _checked(chat_request, asked, history, items)
        try:
            lease = await gateway.admit_shared(key_id, chat, tenant)
        except OpenAIError as exc:
            raise _renamed(exc) from None
        spec = engine_model(gateway.resolve(chat.model, tenant), chat.model)  # (an adapter's own)
        if asked.stream:
            events = ResponseEvents.of(asked, spec)
            answer = await _streamed(
                gateway, asked, chat, items, lease, tenant, owner, store, events
            )
            streaming = True
            return _metered(answer, events, metrics, model, started, gauge, tenant, lease)
        response = await _answered(gateway, asked, chat, lease, tenant, spec)
        usage = _pair(response)
        if asked.store:
            await _keep(store, response, items, owner)
        status = 200
        return JSONResponse(response)
    except OpenAIError as exc:
        status = exc.status
        quota = exc.quota if isinstance(exc, QuotaError) else None
        raise
    except Exception:
        status = 500
        raise
    finally:
        if not streaming:
            gauge.dec()
            metrics.finish(model, ENDPOINT, status, time.perf_counter() - started)
            if metrics.tenants:
                metrics.tenant_finish(tenant, status, usage, lease, quota)


def _checked(make: Callable[..., T], *args: Any) -> T:
    """`make(*args)`, its validation errors a 400 naming the parameter."""
    try:
        return make(*args)
    except ValidationError as exc:
        message, param = validation_message(exc)
        raise OpenAIError(400, message, param=param) from None


async def _conversation(
    store: Local | Shared, response_id: str, owner: str
) -> list[dict[str, Any]]:
    try:
        history = await store.conversation(response_id, owner)
    except Exception as exc:
        raise _unreachable(exc) from None
    if history is None:
        raise OpenAIError(
            400,
            f"Previous response with id {response_id!r} not found.",
            param="previous_response_id",
            code="previous_response_not_found",
        )
    return history


async def _keep(store: Local | Shared, response: dict, items: list[dict], owner: str) -> None:
    """Store a response; when the store cannot be reached, the answer still goes out."""
    try:
        await store.put(response, items, owner)
    except Exception as exc:
        logger.warning("responses: %s not stored: %r", response["id"], exc)


async def _answered(
    gateway: Gateway,
    asked: ResponsesRequest,
    chat: ChatCompletionRequest,
    lease: Lease,
    tenant: str | None,
    model: str,
) -> dict[str, Any]:
    """A non-streaming response, the lease settled with its usage and released."""
    try:
        answer = await gateway.call("chat", chat, tenant)
        lease.settle_usage(answer.get("usage"))
    except OpenAIError as exc:
        lease.settle(0)  # refused or failed: not charged
        raise _renamed(exc) from None
    finally:
        lease.release()
    return from_chat(asked, answer, model)


async def _streamed(
    gateway: Gateway,
    asked: ResponsesRequest,
    chat: ChatCompletionRequest,
    items: list[dict[str, Any]],
    lease: Lease,
    tenant: str | None,
    owner: str,
    store: Local | Shared,
    events: ResponseEvents,
) -> AsyncGenerator[bytes, None]:
    """The events of a streamed response, once its engine has answered its first chunk (an
    error before then is an ordinary error answer); stored at the end when asked."""
    chunks = gateway.stream("chat", chat, tenant)
    try:
        first = await anext(chunks)
    except StopAsyncIteration:
        first = None
    except BaseException as exc:
        lease.settle(0)  # refused or failed before answering: not charged
        lease.release()
        await chunks.aclose()
        raise _renamed(exc) if isinstance(exc, OpenAIError) else exc from None

    skeleton = events.skeleton
    response_id, created = skeleton["id"], skeleton["created_at"]

    async def answer() -> AsyncGenerator[bytes, None]:
        usage, finish, answered_by = None, None, skeleton["model"]
        try:
            yield events.start()
            pending = [first] if first is not None else []
            async for chunk in _chained(pending, chunks):
                answered_by = chunk.get("model") or answered_by
                usage = chunk.get("usage") or usage
                for choice in chunk.get("choices") or []:
                    text = (choice.get("delta") or {}).get("content")
                    if text:
                        yield events.delta(text)
                    finish = choice.get("finish_reason") or finish
            response = finished(asked, response_id=response_id, message_id=events.message_id,
                                created_at=created, model=answered_by, text=events.text,
                                finish_reason=finish, usage=usage)  # fmt: skip
            if asked.store:
                await _keep(store, response, items, owner)
            events.usage = _pair(response)
            yield events.finish(response)
        except OpenAIError as exc:
            logger.warning("responses: stream %s failed: %s", response_id, exc.message)
            yield events.failed(exc.code or "server_error", exc.message)
        except Exception:
            logger.exception("responses: stream %s failed", response_id)
            yield events.failed("server_error", "the engine failed while answering")
        finally:
            await chunks.aclose()
            lease.settle_usage(usage)
            lease.release()

    return answer()


async def _chained(first: list[dict], rest: AsyncIterator[dict]) -> AsyncIterator[dict]:
    for chunk in first:
        yield chunk
    async for chunk in rest:
        yield chunk


def _pair(response: dict[str, Any]) -> tuple[int, int] | None:
    """A Response's (input, output) tokens."""
    usage = response.get("usage")
    return (usage["input_tokens"], usage["output_tokens"]) if usage else None


def _metered(
    answer: AsyncGenerator[bytes, None],
    events: ResponseEvents,
    metrics: StackMetrics,
    model: str | None,
    started: float,
    gauge: Any,
    tenant: str | None,
    lease: Lease | None,
) -> StreamingResponse:
    """The stream's answer, counted in the metrics when it ends (or the client leaves)."""

    async def counted() -> AsyncIterator[bytes]:
        status, first_at = CLIENT_LEFT, None
        try:
            async for data in answer:
                first_at = first_at or time.perf_counter()
                yield data
            status = 200
        finally:
            await answer.aclose()  # the lease released now, also when the client left
            gauge.dec()
            ttft = first_at - started if first_at is not None else None
            metrics.finish(model, ENDPOINT, status, time.perf_counter() - started, ttft_s=ttft)
            if metrics.tenants:
                metrics.tenant_finish(tenant, status, events.usage, lease, None)

    headers = {"cache-control": "no-cache"}
    return StreamingResponse(counted(), media_type=MEDIA_TYPE, headers=headers)


@router.get("/v1/responses/{response_id}")
@router.get("/responses/{response_id}", include_in_schema=False)
async def retrieve_response(
    response_id: str, request: Request, gateway: GatewayDep
) -> dict[str, Any]:
    """A stored response; 404 when unknown, expired, deleted, or another owner's."""
    store = _store(request, gateway)
    try:
        found = await store.get(response_id, caller_of(request).owner)
    except Exception as exc:
        raise _unreachable(exc) from None
    if found is None:
        raise _not_found(response_id)
    return found


@router.delete("/v1/responses/{response_id}")
@router.delete("/responses/{response_id}", include_in_schema=False)
async def delete_response(
    response_id: str, request: Request, gateway: GatewayDep
) -> dict[str, Any]:
    """Forget a stored response (404 as for GET). Later turns that continued it can no longer
    be continued: their conversation lost a turn."""
    store = _store(request, gateway)
    try:
        deleted = await store.delete(response_id, caller_of(request).owner)
    except Exception as exc:
        raise _unreachable(exc) from None
    if not deleted:
        raise _not_found(response_id)
    return {"id": response_id, "object": "response.deleted", "deleted": True}


@router.get("/v1/responses/{response_id}/input_items")
@router.get("/responses/{response_id}/input_items", include_in_schema=False)
async def list_input_items(
    response_id: str,
    request: Request,
    gateway: GatewayDep,
    order: Annotated[Literal["asc", "desc"], Query()] = "desc",
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: Annotated[str | None, Query()] = None,
) -> dict[str, Any]:
    """The items a stored response was generated from (the earlier turns' inputs and outputs,
    then its own input), as a list page: newest first unless `order=asc`."""
    store = _store(request, gateway)
    try:
        items = await store.input_items(response_id, caller_of(request).owner)
    except Exception as exc:
        raise _unreachable(exc) from None
    if items is None:
        raise _not_found(response_id)
    if order == "desc":
        items = items[::-1]
    if after is not None:
        ids = [item["id"] for item in items]
        if after not in ids:
            raise OpenAIError(400, f"no input item {after!r} in this response", param="after")
        items = items[ids.index(after) + 1 :]
    page = items[:limit]
    return {
        "object": "list",
        "data": page,
        "first_id": page[0]["id"] if page else None,
        "last_id": page[-1]["id"] if page else None,
        "has_more": len(items) > limit,
    }
