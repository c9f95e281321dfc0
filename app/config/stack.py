"""The whole stack's configuration: the `args` of a serve config file."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator

from app.config.models import ModelSpec, SecretRef, StrictModel, check_custom_resources
from app.routing import DEFAULT_POLICY, POLICY_NAMES, make_policy

# Policies the routing package has but the engines cannot feed yet: refused with the reason.
NOT_WIRED = {
    "kv": "routes from the engines' KV cache events, which no engine publishes to the router "
    "yet; use 'scored' (the default) or 'prefix'",
}


class RouterSettings(StrictModel):
    """How requests to one model's engine replicas are spread (see `app.routing`)."""

    policy: Literal[POLICY_NAMES] = Field(  # type: ignore[valid-type]
        DEFAULT_POLICY, description="Replica choice for each request."
    )
    settings: dict[str, Any] = Field(
        default_factory=dict, description="Policy settings, e.g. weights or block_size."
    )
    session_key: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9-]{1,64}$",
        description="Header carrying a session id (production-stack's sessionKey); "
        "else the body's `user` field.",
    )

    @model_validator(mode="after")
    def _policy_settings(self) -> RouterSettings:
        if self.policy in NOT_WIRED:
            raise ValueError(f"policy {self.policy!r} {NOT_WIRED[self.policy]}")
        try:
            make_policy(self.policy, **self.settings)
        except TypeError as exc:
            raise ValueError(f"settings do not fit policy {self.policy!r}: {exc}") from None
        return self


class ServerSettings(StrictModel):
    """The ingress deployment."""

    ingress_replicas: int = Field(1, ge=1)
    ingress_cpus: float = Field(0.5, ge=0)
    ingress_resources: dict[str, float] = Field(
        default_factory=dict,
        description="Ray custom resources each ingress replica requests, e.g. "
        "{vrstack-ingress: 1} to pin it to nodes that advertise them (KubeRay manifests do).",
    )
    request_timeout_s: float = Field(
        300, gt=0, description="Longest wait for an engine answer (first byte for streams)."
    )
    retries: int = Field(
        2, ge=0, le=10, description="Retries on another replica when one fails before answering."
    )

    @field_validator("ingress_resources")
    @classmethod
    def _custom_resources(cls, resources: dict[str, float]) -> dict[str, float]:
        return check_custom_resources(resources, "use ingress_cpus for CPUs")


class KeyLimits(StrictModel):
    """Limits for each API key (or for all anonymous callers together when auth is off)."""

    requests_per_second: float | None = Field(None, gt=0, description="Sustained rate; 429.")
    burst: int | None = Field(None, ge=1, description="Requests allowed at once above the rate.")
    tokens_per_minute: int | None = Field(
        None, ge=1, description="Prompt (estimated) plus max_tokens per minute; 429."
    )
    max_concurrent: int | None = Field(None, ge=1, description="Requests in flight; 429.")


class Limits(StrictModel):
    """Caps on what one request may ask for, and per-key rates."""

    max_body_bytes: int = Field(2 * 2**20, ge=1024, description="Larger bodies get 413.")
    max_tokens: int | None = Field(None, ge=1, description="Cap on max_tokens; above it -> 400.")
    max_n: int = Field(8, ge=1, description="Cap on n (choices per request).")
    per_key: KeyLimits = Field(default_factory=KeyLimits)


class AuthSettings(StrictModel):
    """Bearer API keys. Auth is on when any source yields a key; keys are never logged. Without
    a key the ingress serves everyone (with a warning), or refuses to start if `required`."""

    required: bool = Field(
        False,
        description="Refuse to start when no source yields a key (a Secret implies it); "
        "else a stack without keys serves everyone and logs a warning.",
    )

    api_keys: list[SecretStr] = Field(
        default_factory=list, description="Keys in the config itself (prefer env or file)."
    )
    api_keys_env: str | None = Field(
        "VRSTACK_API_KEYS", description="Environment variable with comma-separated keys."
    )
    api_keys_file: str | None = Field(
        None, description="File with one key per line (e.g. a mounted Kubernetes Secret)."
    )
    api_keys_secret: SecretRef | None = Field(
        None,
        description="Kubernetes Secret key with comma-separated keys; the rendered manifests "
        "put it in `api_keys_env` on the ingress pods.",
    )
    protect_metrics: bool = Field(False, description="Require a key for GET /metrics too.")

    @model_validator(mode="after")
    def _sources(self) -> AuthSettings:
        if self.api_keys_secret is not None and not self.api_keys_env:
            raise ValueError(
                "api_keys_secret is read through api_keys_env; set api_keys_env (e.g. "
                "VRSTACK_API_KEYS)"
            )
        if self.required and not (self.api_keys or self.api_keys_env or self.api_keys_file):
            raise ValueError(
                "auth.required needs a place to find keys: api_keys_env, api_keys_file, "
                "api_keys_secret or api_keys"
            )
        return self


class StackConfig(StrictModel):
    """Models behind one URL, plus router, server and limit settings."""

    models: list[ModelSpec] = Field(min_length=1)
    router: RouterSettings = Field(default_factory=RouterSettings)
    server: ServerSettings = Field(default_factory=ServerSettings)
    limits: Limits = Field(default_factory=Limits)
    auth: AuthSettings = Field(default_factory=AuthSettings)

    @model_validator(mode="after")
    def _unique_names(self) -> StackConfig:
        owner: dict[str, str] = {}
        for model in self.models:
            for name in model.names:
                if name in owner:
                    raise ValueError(
                        f"model name {name!r} is used twice (by {owner[name]!r} and {model.name!r})"
                    )
                owner[name] = model.name
        return self

    def model(self, name: str) -> ModelSpec | None:
        """The model a name or alias refers to."""
        return next((m for m in self.models if name in m.names), None)


class ConfigError(ValueError):
    """A config that cannot run; the message names each bad field, value and what is allowed."""


def load_config(args: dict[str, Any] | StackConfig) -> StackConfig:
    """Validate serve-config `args` into a StackConfig or raise ConfigError."""
    if isinstance(args, StackConfig):
        return args
    try:
        return StackConfig.model_validate(args)
    except ValidationError as exc:
        raise ConfigError(format_errors(exc)) from None


def format_errors(exc: ValidationError) -> str:
    lines = [f"invalid vllm-ray-stack config ({exc.error_count()} error(s)):"]
    for err in exc.errors(include_url=False):
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        message = err["msg"].removeprefix("Value error, ")
        got = "" if err["type"] == "missing" else f" (got {err['input']!r})"
        if len(got) > 200:
            got = got[:197] + "...)"
        lines.append(f"  {where}: {message}{got}")
    return "\n".join(lines)
