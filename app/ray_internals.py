"""Every use of a private Ray (and Ray Serve LLM / vLLM engine) API, in one place.

Checked against Ray 2.60.0 with vLLM 0.29.0 (`CHECKED_RAY_VERSION`); each piece below says what it
reaches and why the public API does not do it. `tests/test_ray_internals.py` calls each piece
against the installed Ray, so an upgrade that moves one fails there, not in a running stack.
Everything else in `app` uses Ray's public APIs only (`ray.serve`, `ray.serve.llm`,
`ray.serve.request_router`).
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from types import ModuleType
from typing import Any

from ray.llm._internal.common.callbacks.base import CallbackBase

CHECKED_RAY_VERSION = "2.60.0"
CALLBACK_CLASS = "app.ray_internals:SkipNoOpDownload"
logger = logging.getLogger("vrstack.engine")


def openai_request_models() -> ModuleType:
    """Ray Serve LLM's OpenAI request and response models (vLLM's protocol classes).

    Why: `LLMServer.completions`, `.chat`, `.embeddings`, `.tokenize` and `.detokenize` take
    these parsed objects, and only this private module exports them."""
    from ray.llm._internal.serve.core.configs import openai_api_models

    return openai_api_models


def usage_stats_enabled() -> bool:
    """Whether Ray's usage statistics are on (`ray start --disable-usage-stats` turns them off).

    Why: `NoTelemetryStart` skips the telemetry push exactly when nothing would be sent."""
    from ray._common.usage.usage_lib import usage_stats_enabled as enabled

    return enabled()


class NoTelemetryStart:
    """Mixin for an `LLMServer` subclass: its private `_start_engine`, minus the usage-telemetry
    push when usage stats are disabled.

    Why: that push creates a detached telemetry actor and waits for it, about 5 s of a 2-core
    machine's start-up, for data that is never sent. `LLMServer` has no public switch."""

    engine: Any

    async def _start_engine(self) -> None:
        if usage_stats_enabled():
            await super()._start_engine()  # type: ignore[misc]
        else:
            await self.engine.start()


class SkipNoOpDownload(CallbackBase):
    """`LLMConfig.callback_config` callback: skip Ray Serve LLM's per-node "download" task when
    the model is not in cloud storage (Ray sets a mirror config exactly for `s3://`, `gs://`,
    ... sources and explicit mirrors), creating torch's kernel cache folder itself.

    Why: for a local folder, the embedded model or a Hugging Face id (which vLLM downloads
    itself) that task only creates the folder and returns the model id, yet it costs a new worker
    process importing torch and transformers: 10-17 s of a 2-core machine's start-up. The
    callback API is public (`callback_config`) but its base class is not exported."""

    async def on_before_node_init(self) -> None:
        if self.llm_config.get_engine_config().mirror_config is None:
            import torch

            os.makedirs(os.path.join(torch.hub._get_torch_home(), "kernels"), exist_ok=True)
            self.ctx.run_init_node = False


def add_stat_logger(engine: Any, stat_logger: Any) -> bool:
    """Add `stat_logger` to the stat loggers of Ray Serve LLM's vLLM engine (its `AsyncLLM`
    client's `StatLoggerManager`); False when the engine has none (stats logging disabled).

    Why: vLLM's public way is `AsyncLLM(stat_loggers=...)` at construction, which Ray Serve LLM
    does itself without a hook for extra loggers."""
    client = getattr(engine, "_engine_client", None)
    manager = getattr(client, "logger_manager", None)
    loggers = getattr(manager, "stat_loggers", None)
    if not isinstance(loggers, list):
        return False
    if not any(existing is stat_logger for existing in loggers):
        loggers.append(stat_logger)
    return True


def enable_tokenization(engine: Any) -> None:
    """Give Ray Serve LLM's vLLM engine wrapper vLLM's tokenizer service.

    Why: Ray 2.60 looks it up as `openai_serving_tokenization`; vLLM 0.29 names it
    `serving_tokenization`, which leaves /tokenize and /detokenize disabled."""
    state = getattr(engine, "_app_state", None)
    if getattr(engine, "_oai_serving_tokenization", True) is None and state is not None:
        engine._oai_serving_tokenization = getattr(state, "serving_tokenization", None)


def scoring_service(engine: Any) -> Any:
    """vLLM's scoring service (`ServingScores`) inside Ray Serve LLM's engine wrapper; None when
    the model serves no scores.

    Why: `LLMServer` serves /score through it but has no /rerank, which the same service
    answers in vLLM."""
    return getattr(engine, "_oai_serving_scores", None)


def engine_block_size(engine: Any) -> int | None:
    """The KV cache block size Ray Serve LLM's vLLM engine runs with (None if unknown).

    Why: the block size is resolved by vLLM's platform at start (128 on CPUs unless set);
    Ray Serve LLM keeps the resolved config only on its engine client."""
    config = getattr(getattr(engine, "_engine_client", None), "vllm_config", None)
    size = getattr(getattr(config, "cache_config", None), "block_size", None)
    return size if isinstance(size, int) else None


async def engine_tokenizer(engine: Any) -> tuple[Any, str | None]:
    """The tokenizer of Ray Serve LLM's vLLM engine and the chat template its chat service
    renders with (None when it has none of its own).

    Why: Ray Serve LLM exposes neither; the ingress counts prompt tokens with them
    (`EngineServer.tokenizer_spec`)."""
    tokenizer = engine._engine_client.get_tokenizer()
    if hasattr(tokenizer, "__await__"):
        tokenizer = await tokenizer
    chat = getattr(getattr(engine, "_app_state", None), "openai_serving_chat", None)
    template = getattr(chat, "chat_template", None)
    return tokenizer, template if isinstance(template, str) else None


def started_cluster_address() -> str | None:
    """The GCS address `ray start --head` left in Ray's temp dir (`RAY_TMPDIR` respected), if any.

    Why: `ray status --address auto` and `serve run --address auto` fall back to any GCS process
    found on the machine (a notebook's `ray.init()`, another user's test cluster); this file
    names the one `ray start` made, which is the cluster `vrstack up` may join or stop."""
    from ray._common.utils import get_ray_address_file

    with contextlib.suppress(OSError):
        return Path(get_ray_address_file(None)).read_text().strip() or None
    return None


def forget_started_cluster() -> None:
    """Remove the address `ray start --head` left (as `ray stop` does).

    Why: `ray stop` stops every Ray process on the machine; `vrstack up` stops only its own
    and then forgets the address itself (`ray._common.utils.reset_ray_address`)."""
    from ray._common.utils import reset_ray_address

    reset_ray_address(None)


def use_token_auth_if_available() -> bool:
    """Turn on Ray's token authentication in this process (and so in what it starts) when a
    token is available (`RAY_AUTH_TOKEN`, `RAY_AUTH_TOKEN_PATH` or ~/.ray/auth_token) and
    `RAY_AUTH_MODE` is unset: the rule `ray start` follows for the cluster it starts.

    Why: a process that connects with an explicit address (`serve run --address`,
    `ray.init(address=...)`) does not follow that rule, so against such a cluster it fails with
    InvalidAuthToken; Ray has no public call for the rule (`RAY_AUTH_MODE` is the switch)."""
    from ray._private.authentication.authentication_token_setup import (
        maybe_enable_token_auth_if_token_available,
    )

    return maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


async def load_lora(engine: Any, name: str, path: str) -> None:
    """Load a LoRA adapter into Ray Serve LLM's vLLM engine under `name` (`path`: a local
    folder or a Hugging Face id, which vLLM downloads); ValueError with vLLM's reason when it
    cannot. An adapter unloaded before (`unload_lora`) loads again from its first path.

    Why: Ray Serve LLM loads adapters only through Serve's model multiplexing (a multiplexed
    model id on handle calls, downloads from one `dynamic_lora_loading_path`); its engine's
    `resolve_lora` takes the private `DiskMultiplexConfig`, and skips a name vLLM's model
    table knows, whose weights the engine client's `add_lora` loads again."""
    from ray.llm._internal.serve.core.configs.llm_config import DiskMultiplexConfig

    known = engine._oai_models.lora_requests.get(name)
    if known is not None:
        await engine._engine_client.add_lora(known)
        return
    config = DiskMultiplexConfig(
        model_id=name, max_total_tokens=None, local_path=path, lora_assigned_int_id=0
    )
    await engine.resolve_lora(config)


async def unload_lora(engine: Any, name: str) -> None:
    """Unload a LoRA adapter's weights from Ray Serve LLM's vLLM engine. Its name stays in
    vLLM's model table: a request already past the replica's adapter check still finds it, and
    the engine loads the weights again for it.

    Why: Ray Serve LLM never unloads (vLLM's own cache evicts in its place); the model table
    and the engine client are private attributes of its engine wrapper."""
    known = engine._oai_models.lora_requests.get(name)
    if known is not None:
        await engine._engine_client.remove_lora(known.lora_int_id)


def download_folder(uri: str, folder: str) -> None:
    """Download an object-store folder (s3://, gs://, abfss://, azure://) into `folder`.

    Why: Ray Serve LLM's cloud file systems (boto3 for S3, pyarrow for the others) download
    models and adapters, but are exported from a private module only."""
    from ray.llm._internal.common.utils.cloud_utils import CloudFileSystem

    CloudFileSystem.download_files(folder, uri)
