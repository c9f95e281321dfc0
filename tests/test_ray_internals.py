"""Each private Ray API `app.ray_internals` reaches, called against the installed Ray and vLLM, so
an upgrade that moves one fails here first."""

from __future__ import annotations

import asyncio
import inspect
from types import SimpleNamespace
from typing import Any

import pytest
import ray

from app.config import load_config
from app.engines.llm_config import llm_config
from app.ray_internals import (
    CALLBACK_CLASS,
    CHECKED_RAY_VERSION,
    NoTelemetryStart,
    SkipNoOpDownload,
    add_stat_logger,
    download_folder,
    engine_tokenizer,
    forget_started_cluster,
    load_lora,
    openai_request_models,
    scoring_service,
    started_cluster_address,
    unload_lora,
    usage_stats_enabled,
)


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


def test_checked_against_the_installed_ray() -> None:
    assert ray.__version__ == CHECKED_RAY_VERSION


def test_ray_serve_llm_exports_the_request_models_the_engine_parses() -> None:
    oai = openai_request_models()
    for name in (
        "CompletionRequest",
        "ChatCompletionRequest",
        "EmbeddingCompletionRequest",
        "EmbeddingChatRequest",
        "TokenizeCompletionRequest",
        "TokenizeChatRequest",
        "DetokenizeRequest",
    ):
        assert isinstance(getattr(oai, name), type), name
    request = oai.CompletionRequest(model="m", prompt="hi", max_tokens=2)
    assert request.max_tokens == 2


def test_no_telemetry_start_overrides_llm_servers_engine_start() -> None:
    from ray.serve.llm import LLMServer

    from app.engines.llm_server import EngineServer

    assert inspect.iscoroutinefunction(LLMServer._start_engine)
    assert EngineServer._start_engine is NoTelemetryStart._start_engine
    assert isinstance(usage_stats_enabled(), bool)


def test_ray_serve_llm_still_misnames_vllms_tokenizer_service() -> None:
    from ray.llm._internal.serve.engines.vllm.vllm_engine import VLLMEngine

    source = inspect.getsource(VLLMEngine)
    assert '"openai_serving_tokenization"' in source  # what Ray looks up
    assert "_oai_serving_tokenization" in source  # what enable_tokenization fills in


def test_the_scoring_service_and_the_tokenizer_are_where_they_are_looked_for() -> None:
    from ray.llm._internal.serve.engines.vllm.vllm_engine import VLLMEngine
    from vllm.entrypoints.generate.api_router import init_generate_state

    source = inspect.getsource(VLLMEngine)
    assert "self._oai_serving_scores" in source  # what scoring_service reads (score uses it)
    assert "self._engine_client" in source and "self._app_state" in source
    assert "state.openai_serving_chat" in inspect.getsource(init_generate_state)
    scores = object()
    assert scoring_service(SimpleNamespace(_oai_serving_scores=scores)) is scores
    assert scoring_service(SimpleNamespace()) is None


def test_the_engines_tokenizer_and_its_chat_template_are_read() -> None:
    tokenizer = SimpleNamespace(chat_template="tokenizer's")

    async def get_tokenizer() -> SimpleNamespace:
        return tokenizer

    chat = SimpleNamespace(chat_template="{{ messages }}")
    engine = SimpleNamespace(
        _engine_client=SimpleNamespace(get_tokenizer=get_tokenizer),
        _app_state=SimpleNamespace(openai_serving_chat=chat),
    )
    assert asyncio.run(engine_tokenizer(engine)) == (tokenizer, "{{ messages }}")
    engine._app_state = None
    assert asyncio.run(engine_tokenizer(engine)) == (tokenizer, None)


def test_stat_logger_joins_the_engines_stat_logger_manager() -> None:
    from vllm.v1.engine.async_llm import AsyncLLM

    assert "self.logger_manager" in inspect.getsource(AsyncLLM.__init__)
    stats = object()
    manager = SimpleNamespace(stat_loggers=[])
    engine = SimpleNamespace(_engine_client=SimpleNamespace(logger_manager=manager))
    assert add_stat_logger(engine, stats) and add_stat_logger(engine, stats)
    assert manager.stat_loggers == [stats]
    assert not add_stat_logger(SimpleNamespace(_engine_client=None), stats)


def test_the_address_ray_start_writes_is_read_and_forgotten(tmp_path, monkeypatch) -> None:
    from ray._private.utils import write_ray_address  # what `ray start --head` calls

    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    (tmp_path / "ray").mkdir()  # made by `ray start`
    assert started_cluster_address() is None
    write_ray_address("10.1.2.3:6379")
    assert started_cluster_address() == "10.1.2.3:6379"
    forget_started_cluster()
    assert started_cluster_address() is None


def test_lora_adapters_load_through_the_engines_resolve_lora_then_its_engine_client() -> None:
    """A new adapter: `load_lora` hands Ray Serve LLM's engine the `DiskMultiplexConfig` its
    `resolve_lora` reads (name and path), which puts it in vLLM's model table; one the table
    knows (unloaded before) goes back to the engine client's `add_lora`."""
    from ray.llm._internal.serve.engines.vllm.vllm_engine import VLLMEngine
    from vllm.lora.request import LoRARequest
    from vllm.v1.engine.async_llm import AsyncLLM

    source = inspect.getsource(VLLMEngine.resolve_lora)
    assert "disk_lora_model.model_id" in source and "disk_lora_model.local_path" in source
    assert "_oai_models.lora_requests" in source
    assert {"add_lora", "remove_lora"} <= set(dir(AsyncLLM))
    seen: list[Any] = []

    async def resolve_lora(config: Any) -> None:
        seen.append((config.model_id, config.local_path))

    async def add_lora(lora: Any) -> bool:
        seen.append(lora)
        return True

    known = LoRARequest("poet", 3, "/adapters/poet")
    engine = SimpleNamespace(
        resolve_lora=resolve_lora,
        _oai_models=SimpleNamespace(lora_requests={"poet": known}),
        _engine_client=SimpleNamespace(add_lora=add_lora),
    )
    asyncio.run(load_lora(engine, "sql", "/adapters/sql"))
    asyncio.run(load_lora(engine, "poet", "/adapters/poet"))
    assert seen == [("sql", "/adapters/sql"), known]


def test_lora_adapters_unload_from_the_engine_keeping_their_name() -> None:
    """`unload_lora` asks the engine client's `remove_lora` for the id vLLM's model table gave
    the adapter; the table keeps the name (a request past the check still finds it)."""
    from vllm.entrypoints.openai.models.serving import OpenAIServingModels
    from vllm.lora.request import LoRARequest

    assert "self.lora_requests: dict[str, LoRARequest]" in inspect.getsource(OpenAIServingModels)
    models = SimpleNamespace(lora_requests={"sql": LoRARequest("sql", 7, "/adapters/sql")})
    removed = []

    async def remove_lora(lora_id: int) -> bool:
        removed.append(lora_id)
        return True

    engine = SimpleNamespace(
        _oai_models=models, _engine_client=SimpleNamespace(remove_lora=remove_lora)
    )
    asyncio.run(unload_lora(engine, "sql"))
    asyncio.run(unload_lora(engine, "poet"))  # never loaded: nothing to do
    assert removed == [7] and list(models.lora_requests) == ["sql"]


def test_object_store_folders_download_through_rays_cloud_file_system() -> None:
    from ray.llm._internal.common.utils.cloud_utils import CloudFileSystem

    assert list(inspect.signature(CloudFileSystem.download_files).parameters)[:2] == [
        "path",
        "bucket_uri",
    ]
    with pytest.raises(ValueError, match="Unsupported URI scheme"):
        download_folder("ftp://host/adapter", "/tmp/unused")
