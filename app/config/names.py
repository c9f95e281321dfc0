"""The names clients put in the `model` field: models, aliases and LoRA adapters."""

from __future__ import annotations

import re

MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@-]{0,127}$")


def checked_name(name: str, kind: str = "model") -> str:
    """`name` if it is a valid model-field name, else a ValueError saying what is allowed."""
    if not MODEL_NAME.match(name):
        raise ValueError(
            f"{name!r} is not a valid {kind} name: use 1-128 letters, digits and ._:/@-"
        )
    return name
