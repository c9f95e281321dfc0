"""One model behind the stack: where it comes from, how its engine runs, what it needs."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from app.config.embedded import EMBEDDED_MODELS, EMBEDDED_SCHEME, embedded_name
from app.config.lora import LORA_ENGINE_ARGS, LoraSettings
from app.config.names import checked_name
from app.config.quantity import parse_quantity

# Resources Ray manages itself (num_cpus, num_gpus, memory options; `ray start` flags), which
# therefore cannot be requested or advertised as custom resources.
RAY_BUILTIN_RESOURCES = {"CPU", "GPU", "memory", "object_store_memory"}
CUSTOM_RESOURCE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:/-]{0,62}$")
# vLLM engine arguments that have a field of their own here; naming them in engine_args is an error.
OWN_FIELDS = {"model": "source", "max_model_len": "max_model_len", "dtype": "dtype"}


class StrictModel(BaseModel):
    """Base for config objects: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def check_custom_resources(resources: dict[str, float], builtin_hint: str) -> dict[str, float]:
    """Ray custom resources as `ray start --resources` and Ray's scheduler accept them."""
    for name, amount in resources.items():
        if name in RAY_BUILTIN_RESOURCES or name.startswith("node:"):
            raise ValueError(
                f"{name!r} is a resource Ray sets itself; name a custom resource instead "
                f"({builtin_hint})"
            )
        if not CUSTOM_RESOURCE_NAME.match(name):
            raise ValueError(
                f"resource name {name!r}: use letters, digits and '-', '_', '.', ':', "
                "'/', starting with a letter or digit (it goes on `ray start --resources`)"
            )
        if not math.isfinite(amount) or amount < 0:
            raise ValueError(f"resource {name!r}: the amount must be a number >= 0")
        if amount != 0 and int(amount * 10_000) == 0:
            raise ValueError(f"resource {name!r}: Ray counts amounts in steps of 0.0001")
    return resources


class SecretRef(StrictModel):
    """A key of a Kubernetes Secret, read by the rendered manifests (not by `serve run`)."""

    name: str = Field(
        max_length=253, pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", description="Secret name."
    )
    key: str = Field(max_length=253, pattern=r"^[-._a-zA-Z0-9]+$", description="Key in it.")


ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class Resources(StrictModel):
    """What one engine replica needs (Kubernetes-style quantities for memory and storage)."""

    cpu: float = Field(1.0, gt=0, description="CPUs for one engine replica.")
    gpu: float = Field(0.0, ge=0, description="GPUs for one engine replica (0 = CPU engine).")
    memory: str | None = Field(None, description="Memory for one replica, e.g. '16Gi'.")
    accelerator_type: str | None = Field(None, description="Ray accelerator type, e.g. 'L4'.")
    storage: str | None = Field(None, description="Model cache volume size, e.g. '10Gi'.")
    custom: dict[str, float] = Field(
        default_factory=dict,
        description="Ray custom resources each replica requests, e.g. {vrstack-engine-x: 1} to "
        "pin it to nodes that advertise them (KubeRay manifests pin each model to its group).",
    )

    @field_validator("custom")
    @classmethod
    def _custom(cls, resources: dict[str, float]) -> dict[str, float]:
        return check_custom_resources(resources, "use cpu, gpu and memory for those")

    @field_validator("gpu")
    @classmethod
    def _whole_gpus(cls, value: float) -> float:
        if value > 1 and not value.is_integer():
            raise ValueError(
                f"{value:g} GPUs: above 1, use a whole number (one GPU per engine worker)"
            )
        return value

    @field_validator("memory", "storage")
    @classmethod
    def _quantity(cls, value: str | None) -> str | None:
        if value is not None:
            parse_quantity(value)
        return value

    @model_validator(mode="after")
    def _accelerator_needs_gpu(self) -> Resources:
        if self.accelerator_type and self.gpu == 0:
            raise ValueError("accelerator_type is set but gpu is 0; set gpu >= 1")
        return self

    def memory_bytes(self) -> int | None:
        return None if self.memory is None else int(parse_quantity(self.memory))


class Autoscaling(StrictModel):
    """Ray Serve replica autoscaling for one model."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(16, gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> Autoscaling:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas ({self.min_replicas}) > max_replicas ({self.max_replicas})"
            )
        return self


class KVOffload(StrictModel):
    """KV-cache offload through LMCache (vLLM's `LMCacheConnectorV1`): CPU memory, local disk
    and/or a remote cache server. production-stack's `lmcacheConfig` maps onto it. GPU only."""

    backend: Literal["lmcache"] = "lmcache"
    cpu_gb: float | None = Field(
        None,
        gt=0,
        description="CPU memory for offloaded KV blocks (GB); default 5 unless disk "
        "or remote is set.",
    )
    disk_gb: float | None = Field(None, gt=0, description="Local disk cache size (GB).")
    disk_path: str | None = Field(None, description="Local disk cache folder (with disk_gb).")
    remote_url: str | None = Field(
        None,
        pattern=r"^[a-z][a-z0-9+.-]*://\S+$",
        description="Remote cache, e.g. 'lm://cache-server:65432' or 'redis://host:6379'.",
    )
    chunk_size: int = Field(256, ge=1, description="Tokens per LMCache chunk.")

    @model_validator(mode="after")
    def _disk(self) -> KVOffload:
        if (self.disk_gb is None) != (self.disk_path is None):
            raise ValueError("disk_gb and disk_path go together: set both or neither")
        return self


POOLING_CONVERTS = ("embed", "classify")  # vLLM's `convert` values that make a pooling model
PARALLEL_SIZES = ("tensor_parallel_size", "pipeline_parallel_size")  # GPU workers = product


class ModelSpec(StrictModel):
    """One served model: a name clients use, a source, engine settings and resources."""

    name: str = Field(description="Name clients put in the `model` field.")
    source: str = Field(
        description="Hugging Face id (org/name), a local folder, or 'embedded:smollm2'."
    )
    aliases: list[str] = Field(default_factory=list, description="Other names for this model.")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    max_model_len: int | None = Field(None, ge=16, description="Context length in tokens.")
    engine_args: dict[str, Any] = Field(
        default_factory=dict, description="Other vLLM engine arguments, passed as they are."
    )
    env: dict[str, str] = Field(default_factory=dict, description="Engine process environment.")
    secret_env: dict[str, SecretRef] = Field(
        default_factory=dict,
        description="Engine pod environment from Kubernetes Secrets (rendered manifests only; "
        "with `serve run`, export these variables yourself).",
    )
    replicas: int = Field(1, ge=1, description="Fixed replica count (ignored with autoscaling).")
    autoscaling: Autoscaling | None = None
    resources: Resources = Field(default_factory=Resources)
    kv_offload: KVOffload | None = Field(
        None, description="KV-cache offload (LMCache) to CPU memory, disk or a remote cache."
    )
    lora: LoraSettings | None = Field(
        None, description="LoRA adapters served on this model's engines, loaded at run time."
    )

    @field_validator("name", "aliases")
    @classmethod
    def _names(cls, value: str | list[str]) -> str | list[str]:
        for name in [value] if isinstance(value, str) else value:
            checked_name(name)
        return value

    @field_validator("source")
    @classmethod
    def _source(cls, value: str) -> str:
        name = embedded_name(value)
        if name is not None:
            if name not in EMBEDDED_MODELS:
                allowed = ", ".join(EMBEDDED_SCHEME + n for n in EMBEDDED_MODELS)
                raise ValueError(f"unknown embedded model {name!r}; allowed: {allowed}")
        elif value.startswith(("/", ".", "~")) and not Path(value).expanduser().is_dir():
            raise ValueError(f"local model folder {value!r} does not exist")
        elif not value.strip():
            raise ValueError("source must not be empty")
        return value

    @field_validator("engine_args")
    @classmethod
    def _engine_args(cls, value: dict[str, Any]) -> dict[str, Any]:
        for key in value:
            if key in OWN_FIELDS:
                raise ValueError(
                    f"engine_args.{key} has a field of its own: set `{OWN_FIELDS[key]}` instead"
                )
        for key in PARALLEL_SIZES:
            size = value.get(key, 1)
            if isinstance(size, bool) or not isinstance(size, int) or size < 1:
                raise ValueError(f"engine_args.{key} must be a whole number >= 1, not {size!r}")
        return value

    @model_validator(mode="after")
    def _secret_env(self) -> ModelSpec:
        for name in self.secret_env:
            if not ENV_NAME.match(name):
                raise ValueError(f"secret_env: {name!r} is not an environment variable name")
            if name in self.env:
                raise ValueError(f"{name} is in both env and secret_env; keep one")
        return self

    @model_validator(mode="after")
    def _kv_offload(self) -> ModelSpec:
        if self.kv_offload is None:
            return self
        if self.resources.gpu == 0:
            raise ValueError("kv_offload (LMCache) needs a GPU; set resources.gpu >= 1")
        if "kv_transfer_config" in self.engine_args:
            raise ValueError(
                "engine_args.kv_transfer_config and kv_offload both set the KV connector; keep one"
            )
        return self

    @model_validator(mode="after")
    def _lora(self) -> ModelSpec:
        if self.lora is None:
            return self
        for key, field in LORA_ENGINE_ARGS.items():
            if key in self.engine_args:
                raise ValueError(f"engine_args.{key} and lora both set it: set `{field}` instead")
        return self

    @model_validator(mode="after")
    def _gpus_per_worker(self) -> ModelSpec:
        gpu, workers = self.resources.gpu, self.gpu_workers
        if gpu and math.ceil(gpu) < workers:
            raise ValueError(
                f"resources.gpu {gpu:g} is fewer than the engine's {workers} GPU workers "
                f"(tensor_parallel_size x pipeline_parallel_size); set resources.gpu: {workers}"
            )
        return self

    @property
    def gpu_workers(self) -> int:
        """vLLM's workers, one GPU each: tensor_parallel_size x pipeline_parallel_size."""
        return math.prod(self.engine_args.get(key, 1) for key in PARALLEL_SIZES)

    @property
    def names(self) -> list[str]:
        """The name followed by its aliases."""
        return [self.name, *self.aliases]

    @property
    def adapter_names(self) -> list[str]:
        """Its LoRA adapters' names."""
        return [a.name for a in self.lora.adapters] if self.lora is not None else []

    @property
    def served_names(self) -> list[str]:
        """Every name a request may give for this model: its names and its adapters'."""
        return [*self.names, *self.adapter_names]

    @property
    def embedded_model(self) -> str | None:
        """The embedded model this model is (`source: embedded:<name>`), else None."""
        return embedded_name(self.source)

    @property
    def runner(self) -> Literal["generate", "pooling"] | None:
        """vLLM's runner as the engine args set it (`runner`, or a pooling `convert`); None
        when vLLM picks it from the model's architecture (`runner: auto`)."""
        runner = self.engine_args.get("runner")
        if runner in ("generate", "pooling"):
            return runner
        return "pooling" if self.engine_args.get("convert") in POOLING_CONVERTS else None

    @property
    def on_gpu(self) -> bool:
        return self.resources.gpu > 0
