"""Recording live traffic as a lab trace (`capture` in the config, `vrstack capture`)."""

from __future__ import annotations

from pydantic import Field

from app.config.models import StrictModel


class CaptureSettings(StrictModel):
    """Which requests the ingress records for `vrstack capture`, and how many it keeps."""

    enabled: bool = Field(True, description="Record requests (the section alone turns it on).")
    sample_ratio: float = Field(
        1.0, ge=0, le=1, description="Share of requests recorded (chosen at random)."
    )
    include_text: bool = Field(
        False,
        description="Keep each prompt's text, messages or token ids; else only its block hashes "
        "(the router's), its length and timing.",
    )
    max_records: int = Field(
        100_000,
        ge=1,
        le=10_000_000,
        description="Requests kept for download, across the cluster (the oldest go first); "
        "about 8 bytes a 16-token block each, more with include_text.",
    )
    flush_s: float = Field(
        1.0, gt=0, le=60, description="How often each ingress replica sends its records on."
    )
