"""`vrstack up`'s helpers: the embedded models it converts in the background, a failed Ray head."""

from __future__ import annotations

import tempfile

import pytest

from app import launcher
from app.engines import embedded
from app.launcher import _embedded_to_convert
from app.serve_config import read_serve_config
from app.stack_env import leftovers, local_env, new_run
from tests.conftest import SERVE_CONFIGS


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


def test_a_ray_head_that_fails_to_start_says_why_and_leaves_nothing() -> None:
    """`ray start --head` can fail after it has started the GCS (here: a negative CPU count,
    refused once the GCS runs); `vrstack up` shows Ray's last words and its stop ends the GCS."""
    run = new_run()
    with tempfile.TemporaryDirectory(prefix="vrh", dir="/tmp") as ray_tmp:  # short socket paths
        env = {**local_env(run), "RAY_TMPDIR": ray_tmp}
        with pytest.raises(launcher.RayHeadFailed, match=r"(?s)failed \(exit 1\).*nonnegative"):
            launcher.start_ray_head(-1, env)
        launcher.stop_ray(run)
    assert leftovers(run) == []
