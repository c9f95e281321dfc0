"""/v1/batches (and /batches): OpenAI's Batch API over the online engines (docs/batches.md).

Creating a batch reads its input file (uploaded with `purpose=batch`) and checks every line as
its endpoint checks a request online (the model, the tenant's models and output bounds, the
limits): a file with faults makes a `failed` batch listing them, as OpenAI's does. The requests
then run in the ingress replicas' batch workers (`app.batches.worker`) at the engines' lowest
priority; the batch is `completed` with an output file (and an error file for requests that
failed) once every request is answered. Retrieve, list and cancel the caller's batches.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from pydantic import Field

from app.batches import read_requests
from app.config.models import StrictModel
from app.ingress.protocol import OpenAIRequest
from app.ingress.routes.common import CallerDep
from app.ingress.routes.files import PREFIXES, batch_store, not_found, stored

router = APIRouter(tags=["batches"])
BatchEndpoint = Literal["/v1/chat/completions", "/v1/completions", "/v1/embeddings"]


class BatchRequest(StrictModel):
    """POST /v1/batches."""

    input_file_id: str = Field(min_length=1)
    endpoint: BatchEndpoint
    completion_window: Literal["24h"] = "24h"
    metadata: dict[str, str] | None = Field(None, max_length=16)


async def create(request: Request, caller: CallerDep, asked: BatchRequest) -> dict[str, Any]:
    """A batch of the input file's requests (`failed` at once when a line has a fault)."""
    store = batch_store(request)
    gateway = request.app.state.gateway
    card = await stored(store.file, caller.owner, asked.input_file_id)
    if card is None:
        raise not_found("file", asked.input_file_id, "input_file_id")
    data = await stored(store.content, caller.owner, asked.input_file_id)

    def check(body: OpenAIRequest) -> None:
        gateway.check(body, caller.tenant)

    requests, faults = read_requests(data, asked.endpoint, gateway.config.batches.max_requests,
                                     check)  # fmt: skip
    fields = asked.model_dump()
    return await stored(store.create_batch, caller.owner, fields, requests, faults)


async def list_batches(
    request: Request,
    caller: CallerDep,
    after: Annotated[str | None, Query()] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> dict[str, Any]:
    """The caller's batches, newest first, `limit` after the batch `after`."""
    cards = await stored(batch_store(request).batch_list, caller.owner)
    ids = [card["id"] for card in cards]
    start = ids.index(after) + 1 if after in ids else 0
    page = cards[start : start + limit]
    return {
        "object": "list",
        "data": page,
        "first_id": page[0]["id"] if page else None,
        "last_id": page[-1]["id"] if page else None,
        "has_more": start + limit < len(cards),
    }


async def batch(request: Request, caller: CallerDep, batch_id: str) -> dict[str, Any]:
    card = await stored(batch_store(request).batch, caller.owner, batch_id)
    if card is None:
        raise not_found("batch", batch_id)
    return card


async def cancel(request: Request, caller: CallerDep, batch_id: str) -> dict[str, Any]:
    """Stop the batch: no request of it starts any more; `cancelled` once those running end."""
    card = await stored(batch_store(request).cancel, caller.owner, batch_id)
    if card is None:
        raise not_found("batch", batch_id)
    return card


for prefix in PREFIXES:
    shown = prefix == "/v1"
    router.add_api_route(f"{prefix}/batches", create, methods=["POST"], include_in_schema=shown)
    router.add_api_route(f"{prefix}/batches", list_batches, methods=["GET"],
                         include_in_schema=shown)  # fmt: skip
    router.add_api_route(f"{prefix}/batches/{{batch_id}}", batch, methods=["GET"],
                         include_in_schema=shown)  # fmt: skip
    router.add_api_route(f"{prefix}/batches/{{batch_id}}/cancel", cancel, methods=["POST"],
                         include_in_schema=shown)  # fmt: skip
