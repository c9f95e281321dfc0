"""LoRA adapters served on a model's engines, loaded at run time (`ModelSpec.lora`)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from app.config.names import checked_name

# Object stores an adapter may come from (Ray Serve LLM's cloud file systems download them).
OBJECT_STORES = ("s3://", "gs://", "abfss://", "azure://")
HF_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's allowed max_lora_rank values
# vLLM engine arguments the `lora` settings set; naming them in engine_args too is an error.
LORA_ENGINE_ARGS = {
    "enable_lora": "lora",
    "max_loras": "lora.max_active",
    "max_cpu_loras": "lora.max_adapters_per_replica",
    "max_lora_rank": "lora.max_rank",
}


def is_local(source: str) -> bool:
    """A source naming a folder on the engine's node."""
    return source.startswith(("/", ".", "~"))


class LoraAdapter(BaseModel):
    """One adapter: the model name clients use for it, and where its weights are."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="Model name clients use for the adapter.")
    source: str = Field(
        description="A local folder (absolute path), a Hugging Face id (org/name), or an "
        "object-store folder (s3://, gs://, abfss://, azure://)."
    )

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return checked_name(value, "adapter")

    @field_validator("source")
    @classmethod
    def _source(cls, value: str) -> str:
        if value.startswith(OBJECT_STORES):
            if len(value.split("://", 1)[1].strip("/")) == 0:
                raise ValueError(f"{value!r} names no bucket or folder")
            return value
        if is_local(value):
            if value.startswith("."):
                raise ValueError(
                    f"local adapter folder {value!r}: give an absolute path (or one under ~); "
                    "engine processes do not run in this folder"
                )
            folder = Path(value).expanduser()
            if not (folder / "adapter_config.json").is_file():
                raise ValueError(
                    f"local adapter folder {value!r} has no adapter_config.json (a PEFT "
                    "adapter folder, as `save_pretrained` writes it)"
                )
            return value
        if not HF_ID.match(value):
            raise ValueError(
                f"adapter source {value!r}: give an absolute local folder, a Hugging Face id "
                f"(org/name) or an object-store folder ({', '.join(OBJECT_STORES)})"
            )
        return value

    @property
    def object_store(self) -> bool:
        return self.source.startswith(OBJECT_STORES)

    def local_rank(self) -> int | None:
        """The rank in a local folder's `adapter_config.json` (None: not local, or unread)."""
        if not is_local(self.source):
            return None
        try:
            folder = Path(self.source).expanduser()
            config = json.loads((folder / "adapter_config.json").read_text())
        except (OSError, ValueError):
            return None
        rank = config.get("r") if isinstance(config, dict) else None
        return rank if isinstance(rank, int) else None


class LoraSettings(BaseModel):
    """A model's LoRA adapters and how many each engine replica holds.

    Each replica loads an adapter the first time a request names it (no restart) and keeps at
    most `max_adapters_per_replica`, unloading the least recently used; the router sends an
    adapter's requests to replicas holding it (`app.routing.policies.base.eligible`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    adapters: list[LoraAdapter] = Field(min_length=1, description="The adapters clients may name.")
    max_adapters_per_replica: int = Field(
        4, ge=1, description="Adapters one replica holds at once (vLLM's max_cpu_loras)."
    )
    max_active: int = Field(2, ge=1, description="Adapters in one engine batch (vLLM's max_loras).")
    max_rank: int = Field(16, ge=1, description="The highest adapter rank (vLLM's max_lora_rank).")

    @field_validator("max_rank")
    @classmethod
    def _rank(cls, value: int) -> int:
        if value not in VLLM_RANKS:
            allowed = ", ".join(map(str, VLLM_RANKS))
            raise ValueError(f"max_rank {value}: vLLM takes one of {allowed}")
        return value

    @model_validator(mode="after")
    def _checks(self) -> LoraSettings:
        names = [a.name for a in self.adapters]
        if len(set(names)) != len(names):
            twice = sorted({n for n in names if names.count(n) > 1})
            raise ValueError(f"adapter name(s) used twice: {', '.join(twice)}")
        if self.max_active > self.max_adapters_per_replica:
            raise ValueError(
                f"max_active ({self.max_active}) is above max_adapters_per_replica "
                f"({self.max_adapters_per_replica}); an engine batch uses adapters it holds"
            )
        for adapter in self.adapters:
            rank = adapter.local_rank()
            if rank is not None and rank > self.max_rank:
                raise ValueError(
                    f"adapter {adapter.name!r} has rank {rank}, above max_rank ({self.max_rank})"
                )
        return self

    def engine_kwargs(self) -> dict[str, object]:
        """vLLM's engine arguments for these settings."""
        return {
            "enable_lora": True,
            "max_loras": self.max_active,
            "max_cpu_loras": self.max_adapters_per_replica,
            "max_lora_rank": self.max_rank,
        }
