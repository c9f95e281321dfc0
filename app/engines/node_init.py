"""Ray Serve LLM's node initialization, without the no-op download task.

Before its engine starts, every Ray Serve LLM replica runs one Ray task per node of its placement
group to "download model files". For a model that is not in cloud storage (a local folder, the
embedded model, or a Hugging Face id, which vLLM downloads itself) that task only creates torch's
kernel cache folder and returns the model id unchanged, yet it costs a new worker process that
imports torch and transformers: 10-17 s of a 2-core machine's start-up. This callback (named in
`LLMConfig.callback_config`) skips it for such models and does the folder creation itself.
"""

from __future__ import annotations

import os

from ray.llm._internal.common.callbacks.base import CallbackBase

CALLBACK_CLASS = "app.engines.node_init:SkipNoOpDownload"


class SkipNoOpDownload(CallbackBase):
    """Skip the per-node download task when the model is not in cloud storage (Ray sets a
    mirror config exactly for `s3://`, `gs://`, ... sources and explicit mirrors)."""

    async def on_before_node_init(self) -> None:
        if self.llm_config.get_engine_config().mirror_config is None:
            import torch

            os.makedirs(os.path.join(torch.hub._get_torch_home(), "kernels"), exist_ok=True)
            self.ctx.run_init_node = False
