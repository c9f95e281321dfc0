"""serve_configs/opt125m.yaml on an NVIDIA GPU (production-stack's minimal example).

Skipped without a GPU or without the CUDA build of vLLM (`pip install -e .[gpu]`).
"""

from __future__ import annotations

import shutil
import subprocess

import openai
import pytest

from tests.conftest import SERVE_CONFIGS
from tests.e2e.conftest import deploy, undeploy

pytestmark = [pytest.mark.e2e, pytest.mark.gpu]


def _gpu_reason() -> str | None:
    if shutil.which("nvidia-smi") is None:
        return "no NVIDIA GPU (nvidia-smi not found)"
    if subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode != 0:
        return "nvidia-smi finds no GPU"
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return f"torch {torch.__version__} has no CUDA (install the gpu extra)"
    return None


@pytest.fixture(scope="module")
def opt125m(cluster):
    reason = _gpu_reason()
    if reason:
        pytest.skip(reason)
    stack = deploy(cluster, SERVE_CONFIGS / "opt125m.yaml")
    yield stack
    undeploy(stack)


def test_opt125m_completions_on_gpu(opt125m):
    client = openai.OpenAI(base_url=f"{opt125m.base_url}/v1", api_key="unused", max_retries=0)
    assert {m.id for m in client.models.list().data} == {"facebook/opt-125m", "opt125m"}
    reply = client.completions.create(
        model="facebook/opt-125m", prompt="Once upon a time,", max_tokens=16, temperature=0
    )
    assert reply.choices[0].text.strip() and reply.usage.completion_tokens == 16
    stream = client.completions.create(
        model="opt125m", prompt="Once upon a time,", max_tokens=16, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in stream) == reply.choices[0].text
