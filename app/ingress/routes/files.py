"""/v1/files (and /files): uploads for batches, and batches' result files (docs/batches.md).

Upload a batch input with `purpose=batch` (multipart, as OpenAI's clients send it); list, read,
download (`/content`) and delete the caller's files. Files live in the application's batch store
(`app.batches.store`), shared by every ingress replica; each belongs to the caller's tenant (else
its key).
"""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from app.errors import OpenAIError
from app.ingress.routes.common import CallerDep

router = APIRouter(tags=["batches"])
logger = logging.getLogger("vrstack.ingress")
PURPOSES = ("batch",)  # what may be uploaded (results are `batch_output`)
PREFIXES = ("/v1", "")


def batch_store(request: Request) -> Any:
    """The application's batch store; 404 when `batches` is off."""
    store = request.app.state.batches
    if store is None:
        raise OpenAIError(404, "files and batches are off: see `batches` in the stack's config",
                          code="batches_disabled")  # fmt: skip
    return store


async def stored(call: Any, *args: Any) -> Any:
    """`await call(*args)` on the store; 503 when it cannot be reached."""
    try:
        return await call(*args)
    except Exception as exc:
        logger.warning("batches: the store cannot be reached: %r", exc)
        raise OpenAIError.unreachable("batch store", "batch_store_unavailable") from None


def not_found(kind: str, found_id: str, param: str | None = None) -> OpenAIError:
    return OpenAIError(404, f"no {kind} with id {found_id!r}", param=param, code="not_found")


async def upload(request: Request, caller: CallerDep) -> dict[str, Any]:
    """Keep an uploaded file: the form's `file` and `purpose`."""
    store = batch_store(request)
    settings = request.app.state.gateway.config.batches
    form = request.form(max_files=1, max_fields=4, max_part_size=settings.max_file_bytes)
    try:
        async with form as fields:
            purpose, file = fields.get("purpose"), fields.get("file")
            if purpose not in PURPOSES:
                raise OpenAIError(400, f"purpose must be one of {', '.join(PURPOSES)}",
                                  param="purpose", code="invalid_value")  # fmt: skip
            if not isinstance(file, UploadFile):
                raise OpenAIError(400, "missing required parameter 'file'", param="file")
            data = await file.read(settings.max_file_bytes + 1)
    except HTTPException as exc:  # not a multipart form, or a part too large
        if "maximum size" in str(exc.detail):
            raise _too_large(settings.max_file_bytes) from None
        raise OpenAIError(400, f"expected a multipart form with `file` and `purpose`: "
                          f"{exc.detail}", param="file") from None  # fmt: skip
    if len(data) > settings.max_file_bytes:
        raise _too_large(settings.max_file_bytes)
    card = await stored(store.add_file, caller.owner, file.filename or "upload.jsonl", purpose,
                        data)  # fmt: skip
    if card is None:
        raise OpenAIError(413, "the stack's file store is full; delete files and retry",
                          param="file", code="storage_full")  # fmt: skip
    return card


def _too_large(limit: int) -> OpenAIError:
    return OpenAIError(413, f"the file is larger than {limit} bytes", param="file",
                       code="file_too_large")  # fmt: skip


async def list_files(
    request: Request, caller: CallerDep, purpose: Annotated[str | None, Query()] = None
) -> dict[str, Any]:
    """The caller's files, newest first."""
    cards = await stored(batch_store(request).file_list, caller.owner, purpose)
    return {"object": "list", "data": cards, "has_more": False}


async def file(request: Request, caller: CallerDep, file_id: str) -> dict[str, Any]:
    card = await stored(batch_store(request).file, caller.owner, file_id)
    if card is None:
        raise not_found("file", file_id)
    return card


async def content(request: Request, caller: CallerDep, file_id: str) -> Response:
    """The file's bytes."""
    data = await stored(batch_store(request).content, caller.owner, file_id)
    if data is None:
        raise not_found("file", file_id)
    return Response(data, media_type="application/octet-stream")


async def delete(request: Request, caller: CallerDep, file_id: str) -> dict[str, Any]:
    if not await stored(batch_store(request).delete_file, caller.owner, file_id):
        raise not_found("file", file_id)
    return {"id": file_id, "object": "file", "deleted": True}


for prefix in PREFIXES:
    shown = prefix == "/v1"
    router.add_api_route(f"{prefix}/files", upload, methods=["POST"], include_in_schema=shown)
    router.add_api_route(f"{prefix}/files", list_files, methods=["GET"], include_in_schema=shown)
    router.add_api_route(f"{prefix}/files/{{file_id}}", file, methods=["GET"],
                         include_in_schema=shown)  # fmt: skip
    router.add_api_route(f"{prefix}/files/{{file_id}}", delete, methods=["DELETE"],
                         include_in_schema=shown)  # fmt: skip
    router.add_api_route(f"{prefix}/files/{{file_id}}/content", content, methods=["GET"],
                         include_in_schema=shown)  # fmt: skip
