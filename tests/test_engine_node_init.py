"""Skipping Ray Serve LLM's no-op download task (`app.engines.node_init`), and which embedded
models `vrstack up` converts in the background."""

from __future__ import annotations

import asyncio

import pytest

from app.config import load_config
from app.engines import embedded
from app.engines.llm_config import llm_config
from app.engines.node_init import CALLBACK_CLASS, SkipNoOpDownload
from app.launcher import _embedded_to_convert
from app.serve_config import read_serve_config
from tests.conftest import SERVE_CONFIGS


def _run_init_node(source: str) -> bool:
    spec = load_config({"models": [{"name": "m", "source": "org/m"}]}).models[0]
    config = llm_config(spec, source=source)
    callback = SkipNoOpDownload(llm_config=config, ctx_kwargs={})
    asyncio.run(callback.on_before_node_init())
    return callback.ctx.run_init_node


@pytest.mark.parametrize("source", ["/models/smollm2", "HuggingFaceTB/SmolLM2-135M-Instruct"])
def test_nothing_to_download_skips_the_task(source: str) -> None:
    assert _run_init_node(source) is False


@pytest.mark.parametrize("source", ["s3://bucket/llama", "gs://bucket/llama"])
def test_cloud_storage_models_keep_the_download_task(source: str) -> None:
    assert _run_init_node(source) is True


def test_only_our_builder_opts_in() -> None:
    spec = load_config({"models": [{"name": "m", "source": "org/m"}]}).models[0]
    assert llm_config(spec).callback_config.callback_class == CALLBACK_CLASS
    stock = llm_config(spec, skip_noop_download=False).callback_config.callback_class
    assert stock != CALLBACK_CLASS


def test_up_converts_only_embedded_models_not_yet_prepared(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("VRSTACK_CACHE", str(tmp_path))
    config = read_serve_config(SERVE_CONFIGS / "smollm2-cpu.yaml")
    assert _embedded_to_convert(config) == ["smollm2"]
    folder = embedded.model_dir("smollm2")
    folder.mkdir(parents=True)
    assert _embedded_to_convert(config) == ["smollm2"]  # a half-written folder is not ready
    (folder / ".vrstack-complete").write_text("x\n")
    assert _embedded_to_convert(config) == []
    assert _embedded_to_convert(read_serve_config(SERVE_CONFIGS / "opt125m.yaml")) == []
