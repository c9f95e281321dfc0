"""The whole stack's configuration: the `args` of a serve config file."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationError, ValidationInfo, field_validator, model_validator

from app.config.batches import BatchSettings
from app.config.capture import CaptureSettings
from app.config.models import ModelSpec, StrictModel, check_custom_resources
from app.config.responses import ResponsesSettings
from app.config.tenants import AdmissionSettings, KeyLimits, KeySources, Tenant
from app.config.tracing import TracingSettings
from app.routing import DEFAULT_POLICY, POLICY_NAMES, make_policy, uses_kv_events

SCHEDULING_POLICY = "scheduling_policy"  # vLLM's engine argument: "fcfs" (default) or "priority"


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
    receipts: bool = Field(
        False,
        description="Attach a route receipt (candidates, scores, predicted cached tokens) to "
        "every decision, as a request's `x-route-receipt: 1` header asks for its own; with "
        "tenants configured, receipts go to the logs only, never to answers.",
    )

    @model_validator(mode="after")
    def _policy_settings(self) -> RouterSettings:
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
        2,
        ge=0,
        le=10,
        description="Retries on another replica when one fails before answering; also how often "
        "a stream that breaks later may go on elsewhere.",
    )
    migrate_streams: bool = Field(
        True,
        description="Continue a completions or chat stream whose replica fails mid-stream on "
        "another replica, on the same connection (greedy requests exactly; docs/reliability.md).",
    )

    @field_validator("ingress_resources")
    @classmethod
    def _custom_resources(cls, resources: dict[str, float]) -> dict[str, float]:
        return check_custom_resources(resources, "use ingress_cpus for CPUs")


class Limits(StrictModel):
    """Caps on what one request may ask for, and per-key rates."""

    max_body_bytes: int = Field(2 * 2**20, ge=1024, description="Larger bodies get 413.")
    max_tokens: int | None = Field(None, ge=1, description="Cap on max_tokens; above it -> 400.")
    max_n: int = Field(8, ge=1, description="Cap on n (choices per request).")
    per_key: KeyLimits = Field(default_factory=KeyLimits)


class AuthSettings(KeySources):
    """Bearer API keys. Auth is on when any source (here or in `tenants`) yields a key; keys
    are never logged. Without a key the ingress serves everyone (with a warning), or refuses to
    start if `required`."""

    required: bool = Field(
        False,
        description="Refuse to start when no source yields a key (a Secret implies it); "
        "else a stack without keys serves everyone and logs a warning.",
    )
    api_keys_env: str | None = Field(
        "VRSTACK_API_KEYS", description="Environment variable with comma-separated keys."
    )
    protect_metrics: bool = Field(False, description="Require a key for GET /metrics too.")

    @model_validator(mode="after")
    def _sources(self) -> AuthSettings:
        if self.required and not self.has_source:
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
    tenants: list[Tenant] = Field(
        default_factory=list,
        description="Groups of API keys with their own quotas, priority and models "
        "(docs/tenants.md); keys in `auth` keep `limits.per_key`.",
    )
    admission: AdmissionSettings = Field(
        default_factory=AdmissionSettings,
        description="With tenants: the fair queue in front of each model (docs/tenants.md).",
    )
    tracing: TracingSettings | None = Field(
        None, description="OpenTelemetry traces of the request path, exported by OTLP."
    )
    capture: CaptureSettings | None = Field(
        None, description="Record live traffic as a lab trace (`vrstack capture`)."
    )
    batches: BatchSettings = Field(
        default_factory=BatchSettings,
        description="/v1/files and /v1/batches, run on the engines as their lowest-priority "
        "work (docs/batches.md).",
    )
    responses: ResponsesSettings = Field(
        default_factory=ResponsesSettings,
        description="/v1/responses and its store of responses (docs/responses.md).",
    )

    @model_validator(mode="before")
    @classmethod
    def _priority_scheduling(cls, data: Any) -> Any:
        """With tenants, engines schedule by the `priority` the ingress sets on each request
        (vLLM's `scheduling_policy: priority`), unless a model's engine_args say otherwise."""
        if not isinstance(data, dict) or not data.get("tenants"):
            return data
        models = data.get("models")
        if isinstance(models, list):
            data = {**data, "models": [_with_priority_scheduling(m) for m in models]}
        return data

    @model_validator(mode="after")
    def _prefix_caching_for_kv_events(self) -> StackConfig:
        """A policy reading the engines' KV cache events needs their prefix caches on."""
        if not uses_kv_events(self.router.policy, **self.router.settings):
            return self
        for model in self.models:
            if model.engine_args.get("enable_prefix_caching") is False:
                raise ValueError(
                    f"model {model.name!r}: router policy {self.router.policy!r} routes by the "
                    "engines' prefix caches, but its engine_args turn prefix caching off "
                    "(enable_prefix_caching: false)"
                )
        return self

    @model_validator(mode="after")
    def _unique_names(self) -> StackConfig:
        """Model names, aliases and adapter names: each names one thing."""
        owner: dict[str, str] = {}
        for model in self.models:
            for name in model.served_names:
                if name in owner:
                    raise ValueError(
                        f"model name {name!r} is used twice (by {owner[name]!r} and {model.name!r})"
                    )
                owner[name] = model.name
        return self

    @field_validator("tenants")
    @classmethod
    def _tenants(cls, tenants: list[Tenant], info: ValidationInfo) -> list[Tenant]:
        models: list[ModelSpec] = info.data.get("models") or []
        auth: AuthSettings | None = info.data.get("auth")
        seen: set[str] = set()
        owners: dict[tuple[str, str], str] = {}  # (kind of source, source) -> who reads it
        named = [("auth", auth)] if auth is not None else []
        for owner, sources in [*named, *((f"tenant {t.name!r}", t) for t in tenants)]:
            for kind, source in _key_sources(sources):
                if owners.setdefault((kind, source), owner) != owner:
                    shown = "one of its api_keys" if kind == "api_keys" else f"{kind} {source!r}"
                    raise ValueError(
                        f"{owner}: {shown} is also read by {owners[kind, source]}; a key "
                        "belongs to one tenant (or to auth)"
                    )
        served = [n for m in models for n in m.served_names]
        limits: Limits | None = info.data.get("limits")
        top = limits.max_tokens if limits is not None else None
        for tenant in tenants:
            bound = max(tenant.max_tokens or 0, tenant.default_max_tokens or 0)
            if top is not None and bound > top:
                raise ValueError(
                    f"tenant {tenant.name!r}: its max_tokens or default_max_tokens ({bound}) is "
                    f"above limits.max_tokens ({top}), which holds for every request"
                )
            if tenant.name in seen:
                raise ValueError(f"tenant name {tenant.name!r} is used twice")
            seen.add(tenant.name)
            for name in tenant.models or []:
                if models and name not in served:
                    available = ", ".join(served)
                    raise ValueError(
                        f"tenant {tenant.name!r}: model {name!r} is not served; served names: "
                        f"{available}"
                    )
        return tenants

    def tenant(self, name: str) -> Tenant | None:
        """The tenant of that name."""
        return next((t for t in self.tenants if t.name == name), None)

    def model(self, name: str) -> ModelSpec | None:
        """The model a name, alias or adapter name refers to (an adapter's: its base)."""
        return next((m for m in self.models if name in m.served_names), None)


def _with_priority_scheduling(model: Any) -> Any:
    if isinstance(model, ModelSpec):
        args = {SCHEDULING_POLICY: "priority", **model.engine_args}
        return model.model_copy(update={"engine_args": args})
    args = model.get("engine_args", {}) if isinstance(model, dict) else None
    if isinstance(args, dict):
        return {**model, "engine_args": {SCHEDULING_POLICY: "priority", **args}}
    return model


def _key_sources(sources: KeySources) -> list[tuple[str, str]]:
    """The places `sources` reads keys from, as (kind, place); literal keys by their text."""
    places = [("api_keys", k.get_secret_value().strip()) for k in sources.api_keys]
    places += [("api_keys_env", sources.api_keys_env), ("api_keys_file", sources.api_keys_file)]
    if sources.api_keys_secret is not None:
        secret = sources.api_keys_secret
        places.append(("api_keys_secret", f"{secret.name}/{secret.key}"))
    return [(kind, place) for kind, place in places if place]


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
        got = "" if err["type"] == "missing" else f" (got {_redacted(err['input'])!r})"
        if len(got) > 200:
            got = got[:197] + "...)"
        lines.append(f"  {where}: {message}{got}")
    return "\n".join(lines)


def _redacted(value: Any) -> Any:
    """`value` with the text of every `api_keys` entry hidden (error messages get logged)."""
    if isinstance(value, dict):
        return {k: "**********" if k == "api_keys" else _redacted(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_redacted(v) for v in value]
    return value
