"""GET /capture: the requests recorded across the cluster as a lab trace (JSONL), for
`vrstack capture` and `vrstack lab --trace` (docs/configuration.md#capture); GET /capture/status:
how many are kept. Never an open path: a key is needed whenever auth is on, and with tenants
only a key without a tenant (an operator's) may read them: the trace holds every tenant's
prompts (as block hashes: a prefix oracle), sessions and timing.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from app.capture import Recorder, timed_lines
from app.errors import OpenAIError

router = APIRouter(tags=["capture"])
logger = logging.getLogger("vrstack.ingress")
JSONL = "application/x-ndjson"


def _recorder(request: Request) -> Recorder:
    """The ingress's recorder; 404 when capture is off, 403 for a tenant's key."""
    recorder: Recorder | None = request.app.state.capture
    if recorder is None:
        raise OpenAIError(
            404, "capture is off: set `capture:` in the stack's config", code="capture_disabled"
        )
    if getattr(request.state, "tenant", None) is not None:
        raise OpenAIError(403, "a tenant's key cannot read the capture", code="permission_denied")
    return recorder


def _unavailable(exc: Exception) -> OpenAIError:
    logger.warning("capture: the store cannot be read: %r", exc)
    return OpenAIError.unreachable("capture store", "capture_unavailable")


@router.get("/capture", include_in_schema=False)
async def capture(
    request: Request,
    since: Annotated[float, Query(description="Only requests from then (epoch seconds).")] = 0.0,
) -> Response:
    """The recorded requests from `since`, oldest first, as trace lines timed from the first
    (`x-vrstack-capture-start`: its epoch time)."""
    recorder = _recorder(request)
    try:
        records = await recorder.read(since)
    except Exception as exc:
        raise _unavailable(exc) from None
    lines, start = timed_lines(records)
    headers = {"x-vrstack-capture-records": str(len(lines))}
    if start is not None:
        headers["x-vrstack-capture-start"] = f"{start:.6f}"
    return Response("".join(lines), media_type=JSONL, headers=headers)


@router.get("/capture/status", include_in_schema=False)
async def capture_status(request: Request) -> dict[str, Any]:
    """Records kept and dropped, the oldest and newest arrival, the store's clock, settings."""
    recorder = _recorder(request)
    try:
        return await recorder.status()
    except Exception as exc:
        raise _unavailable(exc) from None
