"""Shared test fixtures and paths."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SERVE_CONFIGS = ROOT / "serve_configs"


@pytest.fixture
def cpu_model() -> dict:
    """A valid CPU model entry (as in serve_configs/smollm2-cpu.yaml)."""
    return {
        "name": "smollm2",
        "source": "embedded:smollm2",
        "aliases": ["default"],
        "dtype": "float32",
        "max_model_len": 2048,
        "engine_args": {"enforce_eager": True},
    }
