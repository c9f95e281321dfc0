"""Tenants: groups of API keys with a priority class, a weight, quotas, allowed models and
output bounds (docs/tenants.md)."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator

from app.config.models import SecretRef, StrictModel
from app.config.names import checked_name

TENANT_NAME = re.compile(r"^[a-z0-9]([a-z0-9_-]{0,61}[a-z0-9])?$")
RESERVED_TENANT_NAMES = frozenset({"anonymous"})  # the metrics label of callers without a tenant
# Priority classes as vLLM's `priority` values: lower is served first.
PRIORITY_CLASSES = {"interactive": 0, "standard": 10, "batch": 20}
PriorityClass = Literal["interactive", "standard", "batch"]


class KeySources(StrictModel):
    """Where API keys are found: the config, an environment variable, a file, a Secret."""

    api_keys: list[SecretStr] = Field(
        default_factory=list, description="Keys in the config itself (prefer env or file)."
    )
    api_keys_env: str | None = Field(
        None, description="Environment variable with comma-separated keys."
    )
    api_keys_file: str | None = Field(
        None, description="File with one key per line (e.g. a mounted Kubernetes Secret)."
    )
    api_keys_secret: SecretRef | None = Field(
        None,
        description="Kubernetes Secret key with comma-separated keys; the rendered manifests "
        "put it in `api_keys_env` on the ingress pods.",
    )

    @model_validator(mode="after")
    def _secret_through_env(self) -> KeySources:
        if self.api_keys_secret is not None and not self.api_keys_env:
            raise ValueError(
                "api_keys_secret is read through api_keys_env; set api_keys_env (e.g. "
                "VRSTACK_API_KEYS)"
            )
        return self

    @property
    def has_source(self) -> bool:
        return bool(self.api_keys or self.api_keys_env or self.api_keys_file)


class KeyLimits(StrictModel):
    """Limits for each API key (or for all anonymous callers together when auth is off)."""

    requests_per_second: float | None = Field(None, gt=0, description="Sustained rate; 429.")
    burst: int | None = Field(None, ge=1, description="Requests allowed at once above the rate.")
    tokens_per_minute: int | None = Field(
        None, ge=1, description="Prompt (estimated) plus max_tokens per minute; 429."
    )
    max_concurrent: int | None = Field(None, ge=1, description="Requests in flight; 429.")


class TenantQuotas(KeyLimits):
    """A tenant's quotas, shared by all its keys across the ingress replicas (the cluster's
    quota ledger; in one process without Ray)."""

    tokens_per_day: int | None = Field(
        None, ge=1, description="Prompt plus output tokens per UTC day; 429 until midnight UTC."
    )


class AdmissionSettings(StrictModel):
    """Fair admission in front of each model, with tenants configured (docs/tenants.md)."""

    max_wait_s: float = Field(
        30.0, gt=0, le=3600, description="Longest wait in the queue for an engine slot; 503."
    )
    max_queue_per_tenant: int = Field(
        64, ge=1, le=100_000, description="Waiters per tenant and model; one more: 429."
    )
    demote_backlog: int | None = Field(
        16,
        ge=1,
        le=100_000,
        description="A tenant with this many requests waiting for a model queues its next "
        "ones one priority step lower (their engine requests carry it); null: never.",
    )
    preempt: bool = Field(
        True,
        description="With every engine slot held, a waiter stops a stream of a less important "
        "class, which goes on from its tokens when a slot is free (needs "
        "server.migrate_streams).",
    )


class Tenant(KeySources):
    """One tenant: its keys, priority, weight, quotas, models and output bounds."""

    name: str = Field(description="1-63 lowercase letters, digits, '-' and '_'; a metrics label.")
    priority: PriorityClass | int = Field(
        "standard",
        description="interactive, standard or batch (vLLM priorities 0, 10, 20), or a vLLM "
        "priority 0-1000 itself: lower is served first.",
    )
    weight: float = Field(
        1.0, gt=0, le=1000, description="Share of token service within its priority class."
    )
    quotas: TenantQuotas = Field(default_factory=TenantQuotas)
    models: list[str] | None = Field(
        None, description="Model names or aliases it may use (all when unset); others: 404."
    )
    default_max_tokens: int | None = Field(
        None, ge=1, description="Output bound set on requests that give none (else max_tokens)."
    )
    max_tokens: int | None = Field(
        None, ge=1, description="Largest max_tokens a request may ask for; above it: 400."
    )

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not TENANT_NAME.match(value):
            raise ValueError(
                f"tenant name {value!r}: use 1-63 lowercase letters, digits, '-' and '_', "
                "starting and ending with a letter or digit"
            )
        if value in RESERVED_TENANT_NAMES:
            raise ValueError(f"tenant name {value!r} is reserved for callers without a tenant")
        return value

    @field_validator("priority")
    @classmethod
    def _priority(cls, value: str | int) -> str | int:
        if isinstance(value, int) and not 0 <= value <= 1000:
            raise ValueError(f"priority {value}: use a class name or a number from 0 to 1000")
        return value

    @field_validator("models")
    @classmethod
    def _models(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and not value:
            raise ValueError("models: list at least one model, or leave it out for all models")
        for name in value or []:
            checked_name(name)
        return value

    @model_validator(mode="after")
    def _output_bounds(self) -> Tenant:
        if not self.has_source:
            raise ValueError(
                f"tenant {self.name!r} has no key source: set api_keys_env, api_keys_file, "
                "api_keys_secret or api_keys"
            )
        top, default = self.max_tokens, self.default_max_tokens
        if top is not None and default is not None and default > top:
            raise ValueError(f"default_max_tokens ({default}) is above max_tokens ({top})")
        return self

    @property
    def priority_value(self) -> int:
        """The priority as vLLM's `priority` (lower is served first)."""
        return PRIORITY_CLASSES[self.priority] if isinstance(self.priority, str) else self.priority

    @property
    def output_default(self) -> int | None:
        """The max_tokens set on a request that gives none."""
        return self.default_max_tokens or self.max_tokens
