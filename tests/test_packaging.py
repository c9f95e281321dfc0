"""The wheel built from pyproject.toml ships the product (`app`) and no benchmark harness."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from tests.conftest import ROOT


def test_the_wheel_ships_app_and_no_benchmark_harness(tmp_path: Path) -> None:
    source = tmp_path / "source"  # a clean copy: no build/ left over from an earlier build
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    skip = shutil.ignore_patterns("__pycache__", "*.pyc")
    for folder in ("app", "benchmarks", "tests"):
        shutil.copytree(ROOT / folder, source / folder, ignore=skip)
    pip = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
    subprocess.run(
        [*pip, "-w", str(tmp_path / "dist"), str(source)],
        check=True,
        capture_output=True,
    )
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")} == {"app"}
    harness = {p.stem for p in (ROOT / "benchmarks").glob("*.py")} - {"__init__"}
    shipped = {Path(n).stem for n in names if n.endswith(".py")}
    assert not harness & shipped, harness & shipped
    assert {"app/cli/__init__.py", "app/engines/llm_server.py", "app/lab/simulator.py"} <= set(
        names
    )
