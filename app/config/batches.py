"""Files and batches (`batches` in the config; docs/batches.md): OpenAI's Batch API run on the
online engines as their lowest-priority work."""

from __future__ import annotations

from pydantic import Field

from app.config.models import StrictModel


class BatchSettings(StrictModel):
    """`/v1/files` and `/v1/batches`: how much the cluster stores, and how hard batches may
    press on the engines that serve interactive traffic."""

    enabled: bool = Field(True, description="Serve /v1/files and /v1/batches (off: 404).")
    max_stored_bytes: int = Field(
        256 * 2**20,
        ge=2**20,
        description="Bytes of files (uploads and results) kept across the cluster; an upload "
        "that would pass it is refused (413) until files are deleted.",
    )
    max_file_bytes: int = Field(
        100 * 2**20, ge=1024, description="The largest upload (OpenAI's limit for batch input)."
    )
    max_requests: int = Field(
        50_000, ge=1, description="Requests in one batch input file (OpenAI's limit)."
    )
    max_concurrent: int = Field(
        1,
        ge=1,
        le=1024,
        description="Batch requests each ingress replica runs at once per model; a model whose "
        "engines queue requests gets no new batch request until the queue is empty.",
    )
    max_interactive: int | None = Field(
        0,
        ge=0,
        description="A batch request starts only while the model's engines answer at most this "
        "many interactive requests (0: only when they are idle; null: whatever they answer).",
    )
    priority: int = Field(
        30,
        description="vLLM `priority` of batch requests on engines that schedule by priority "
        "(lower runs first; tenants' classes are 0, 10 and 20).",
    )
