"""This project's serving part as a byte-for-byte deterministic source distribution
(`.tar.xz`, which pip installs), the package the default manifests carry in a ConfigMap
(`app.k8s.render`)."""

from __future__ import annotations

import hashlib
import io
import lzma
import re
import tarfile
from functools import cache
from pathlib import Path, PurePosixPath

from app import __version__

DISTRIBUTION = "vllm_ray_stack"  # the sdist's name (PEP 625: normalized, underscores)
# Its base64 text must fit a ConfigMap (1 MiB) and, with the rest of the object, client-side
# `kubectl apply`'s last-applied-configuration annotation (256 KiB in all).
MAX_BASE64_BYTES = 200 * 1024
# Everything setuptools reads to build the wheel (pyproject.toml: `readme`; no license file,
# no package data: `app` reads no file of its own), and the package itself.
TOP_FILES = ("pyproject.toml", "README.md")
PACKAGE_DIR = "app"
# What the cluster's pods do not run, left out to keep the archive within a ConfigMap: the
# `vrstack` command's own parts (folders, and modules only it imports) and the routing lab (the
# pods serve; `serve run` and Ray import only the serving path). An image built with the
# package (--image) has all of it.
NOT_SERVED = ("cli", "k8s", "bench", "lab")
NOT_SERVED_MODULES = ("launcher.py", "stack_env.py", "observability/dashboard.py")
SERVED_ANYWAY = ("lab/__init__.py", "lab/trace.py")  # the trace format capture writes
# The label the package ConfigMaps carry (`vrstack k8s delete` finds earlier versions' by it)
COMPONENT_LABEL, PACKAGE_COMPONENT = "app.kubernetes.io/component", "package"
SOURCE_EPOCH = 946684800  # 2000-01-01: wheels (zip) cannot hold times before 1980
# xz: preset 6 with a 1 MiB dictionary (the sources are smaller; little memory to compress)
XZ_FILTERS = ({"id": lzma.FILTER_LZMA2, "preset": 6, "dict_size": 1 << 20},)


def source_root() -> Path:
    """The checkout this package runs from (editable install or the repository itself)."""
    root = Path(__file__).resolve().parents[2]
    if not (root / "pyproject.toml").is_file():
        raise ValueError(
            f"no pyproject.toml in {root}: the default manifests carry this package's source, "
            "so render from a checkout (pip install -e .), or use --image or --package"
        )
    return root


def archive_name() -> str:
    """The sdist's file name, `vllm_ray_stack-<version>.tar.xz`."""
    return f"{DISTRIBUTION}-{__version__}.tar.xz"


def check_version(root: Path) -> None:
    """pyproject.toml's `[project] version` is the package's (the sdist's name says it)."""
    text = (root / "pyproject.toml").read_text()
    found = re.search(r'^\[project\]$.*?^version\s*=\s*"([^"]+)"', text, re.M | re.S)
    if not found or found.group(1) != __version__:
        raise ValueError(f"{root / 'pyproject.toml'}: [project] version is not {__version__}")


def source_files(root: Path) -> list[str]:
    """The sdist's files, relative to `root`, sorted: the package but its `NOT_SERVED` parts."""
    package = [
        p.relative_to(root).as_posix()
        for p in (root / PACKAGE_DIR).rglob("*.py")
        if "__pycache__" not in p.parts and not _not_served(p.relative_to(root / PACKAGE_DIR))
    ]
    return sorted([*TOP_FILES, *package])


def _not_served(path: Path) -> bool:
    if path.as_posix() in SERVED_ANYWAY:
        return False
    if path.as_posix() in NOT_SERVED_MODULES:
        return True
    return len(path.parts) > 1 and path.parts[0] in NOT_SERVED


def build_sdist(root: Path) -> bytes:
    """The `.tar.xz` of `root`'s sources: same bytes on every run and machine."""
    check_version(root)
    top = archive_name().removesuffix(".tar.xz")
    files = source_files(root)
    folders = sorted({p.as_posix() for f in files for p in PurePosixPath(f).parents} - {"."})
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for folder in ["", *folders]:
            _add(tar, f"{top}/{folder}".rstrip("/"), None)
        for name in files:
            _add(tar, f"{top}/{name}", (root / name).read_bytes())
    data = buffer.getvalue()
    return lzma.compress(data, lzma.FORMAT_XZ, lzma.CHECK_CRC64, filters=XZ_FILTERS)


def _add(tar: tarfile.TarFile, name: str, data: bytes | None) -> None:
    """One entry, owned by root, dated SOURCE_EPOCH; a directory when `data` is None."""
    info = tarfile.TarInfo(name)
    info.mtime, info.uid, info.gid, info.uname, info.gname = SOURCE_EPOCH, 0, 0, "", ""
    if data is None:
        info.type, info.mode = tarfile.DIRTYPE, 0o755
        tar.addfile(info)
    else:
        info.size, info.mode = len(data), 0o644
        tar.addfile(info, io.BytesIO(data))


@cache
def sdist() -> tuple[bytes, str]:
    """This checkout's sdist and its sha256 (hex), built once per process."""
    data = build_sdist(source_root())
    return data, hashlib.sha256(data).hexdigest()
