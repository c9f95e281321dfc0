"""`vrstack up`'s helpers: which embedded models it converts in the background."""

from __future__ import annotations

from app.engines import embedded
from app.launcher import _embedded_to_convert
from app.serve_config import read_serve_config
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
