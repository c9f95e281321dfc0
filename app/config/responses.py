"""The stack's store of Responses API answers (`responses` in the config; docs/responses.md)."""

from __future__ import annotations

from pydantic import Field

from app.config.models import StrictModel


class ResponsesSettings(StrictModel):
    """`/v1/responses`: whether it is served, and how many stored responses the cluster keeps
    for how long (for `GET /v1/responses/{id}` and `previous_response_id`)."""

    enabled: bool = Field(True, description="Serve /v1/responses (off: 404).")
    max_stored: int = Field(
        10_000,
        ge=1,
        le=1_000_000,
        description="Responses kept across the cluster; the least recently used go first.",
    )
    ttl_s: float = Field(
        86_400.0,
        gt=0,
        le=30 * 86_400,
        description="Seconds a stored response is kept after it was last created, read or "
        "continued (`previous_response_id`).",
    )
