"""`vrstack k8s ...` (render, validate, apply, status, delete) and `vrstack import-values`."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from rich.console import Console

from app.config import ConfigError

k8s_cli = typer.Typer(help="RayService manifests on KubeRay: render, validate, apply, status.")
console = Console(stderr=True)
SERVE_CONFIGS = Path("serve_configs")
OUT_DIR = Path("kuberay")
Kubeconfig = Annotated[str | None, typer.Option(help="kubeconfig file (default: $KUBECONFIG).")]
Context = Annotated[str | None, typer.Option(help="kubeconfig context.")]
Namespace = Annotated[
    str | None, typer.Option("--namespace", "-n", help="Namespace (default: the context's).")
]


def _die(message: str, code: int = 1) -> typer.Exit:
    console.print(message, markup=False, highlight=False, soft_wrap=True)
    return typer.Exit(code)


def _upgrade(strategy: str, gateway_class: str | None, max_surge_percent: int | None,
             step_size_percent: int | None, interval_seconds: int | None):  # fmt: skip
    """--upgrade-strategy's ClusterUpgradeOptions (exit 2 when the options do not fit it)."""
    from app.k8s.options import (
        INCREMENTAL_UPGRADE,
        UPGRADE_INTERVAL_S,
        UPGRADE_STRATEGIES,
        ClusterUpgradeOptions,
    )

    if strategy not in UPGRADE_STRATEGIES:
        choices = ", ".join(UPGRADE_STRATEGIES)
        raise _die(f"--upgrade-strategy must be one of {choices} (got {strategy!r})", 2)
    given = (gateway_class, max_surge_percent, step_size_percent, interval_seconds)
    if strategy != INCREMENTAL_UPGRADE and any(v is not None for v in given):
        raise _die(
            "--gateway-class, --max-surge-percent, --step-size-percent and --interval-seconds "
            f"only apply to --upgrade-strategy {INCREMENTAL_UPGRADE}",
            2,
        )
    return ClusterUpgradeOptions(
        gateway_class_name=gateway_class,
        max_surge_percent=max_surge_percent,
        step_size_percent=step_size_percent,
        interval_seconds=UPGRADE_INTERVAL_S if interval_seconds is None else interval_seconds,
    )


@k8s_cli.command()
def render(
    configs: Annotated[list[Path] | None, typer.Argument(help="Serve config files.")] = None,
    all_: Annotated[bool, typer.Option("--all", help="Every serve_configs/*.yaml.")] = False,
    out_dir: Annotated[
        Path, typer.Option(help="Where manifests go (the minimal stack; others in examples/).")
    ] = OUT_DIR,
    stdout: Annotated[bool, typer.Option("--stdout", help="Print instead of writing.")] = False,
    check: Annotated[bool, typer.Option(help="Exit 1 if a file differs (write nothing).")] = False,
    name: Annotated[str | None, typer.Option(help="RayService name (one config).")] = None,
    image: Annotated[
        str | None,
        typer.Option(
            help="Image of every pod, with this package in it (built from kuberay/image/); "
            "default: Ray's public image, the package installed at start-up from a ConfigMap."
        ),
    ] = None,
    working_dir: Annotated[
        str | None, typer.Option(help="Remote zip URI of this project (runtime_env working_dir).")
    ] = None,
    package: Annotated[
        str | None,
        typer.Option(
            help="pip requirement Ray's images install this package from (runtime_env pip), "
            "e.g. a wheel's URL; default: this checkout's sdist, carried in a ConfigMap."
        ),
    ] = None,
    label: Annotated[
        list[str] | None,
        typer.Option(
            "--label", help="KEY=VALUE label on every document and pod (repeat for more)."
        ),
    ] = None,
    storage_class: Annotated[
        str | None,
        typer.Option(help="StorageClass of the model-cache claim (default: the cluster's)."),
    ] = None,
    pod_monitor: Annotated[
        bool,
        typer.Option(help="Add a PodMonitor (needs the Prometheus operator's CRDs)."),
    ] = False,
    upgrade_strategy: Annotated[
        str,
        typer.Option(
            help="NewCluster (blue/green: a second cluster, then the switch), None (in place, no "
            "new cluster) or NewClusterWithIncrementalUpgrade (the new cluster grows step by step "
            "while a Gateway moves traffic; needs model autoscaling and --gateway-class)."
        ),
    ] = "NewCluster",
    gateway_class: Annotated[
        str | None,
        typer.Option(help="Incremental upgrades: a GatewayClass of the cluster (e.g. istio)."),
    ] = None,
    max_surge_percent: Annotated[
        int | None,
        typer.Option(
            min=0,
            max=100,
            help="Incremental upgrades: Serve capacity added per step, in % (default: one pod "
            "of the largest worker group).",
        ),
    ] = None,
    step_size_percent: Annotated[
        int | None,
        typer.Option(
            min=0,
            max=100,
            help="Incremental upgrades: traffic moved per interval, in % (default: the max surge).",
        ),
    ] = None,
    interval_seconds: Annotated[
        int | None,
        typer.Option(min=1, help="Incremental upgrades: seconds between traffic moves (60)."),
    ] = None,
    hf_token_secret: Annotated[str, typer.Option(help="Secret with key 'token'.")] = "hf-token",
) -> None:
    """Render serve configs into RayService manifests (kuberay/opt125m.yaml, the minimal stack;
    kuberay/examples/X.yaml, the others); with --all also the Grafana dashboard
    (kuberay/grafana-dashboard.yaml, docs/grafana/vrstack-dashboard.json)."""
    from app.k8s.options import RenderOptions
    from app.k8s.render import companion_files, default_name, output_path, render_file

    paths = sorted(SERVE_CONFIGS.glob("*.yaml")) if all_ else list(configs or [])
    if not paths:
        raise _die("name serve config files, or pass --all", 2)
    if name and len(paths) > 1:
        raise _die("--name needs exactly one serve config", 2)
    labels = _labels(label or [])
    drift = []
    upgrade = _upgrade(
        upgrade_strategy, gateway_class, max_surge_percent, step_size_percent, interval_seconds
    )
    for path in paths:
        options = RenderOptions(
            name=name or default_name(path),
            image=image,
            working_dir=working_dir,
            package=package,
            upgrade_strategy=upgrade_strategy,  # type: ignore[arg-type]  # checked by _upgrade
            cluster_upgrade=upgrade,
            hf_token_secret=hf_token_secret,
            pod_monitor=pod_monitor,
            labels=labels,
            storage_class=storage_class,
        )
        try:
            text = render_file(path, options)
        except (ConfigError, ValueError) as exc:
            raise _die(str(exc), 2) from None
        _emit(str(path), output_path(path, out_dir), text, stdout, check, drift)
    if all_ and not stdout:
        for target, text in companion_files(out_dir).items():
            _emit("dashboard", target, text, stdout, check, drift)
    if drift:
        raise _die(f"out of date (run `vrstack k8s render --all`): {', '.join(drift)}", 1)


def _labels(pairs: list[str]) -> dict[str, str]:
    """`--label KEY=VALUE` options as a dict (syntax checked by the renderer)."""
    labels = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise _die(f"--label takes KEY=VALUE (got {pair!r})", 2)
        labels[key] = value
    return labels


def _emit(source: str, target: Path, text: str, stdout: bool, check: bool, drift: list) -> None:
    if stdout:
        sys.stdout.write(text)
    elif check:
        if not target.is_file() or target.read_text() != text:
            drift.append(str(target))
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        console.print(f"[green]✓[/] {source} -> {target}")


@k8s_cli.command()
def validate(
    paths: Annotated[list[Path] | None, typer.Argument(help="Manifest files.")] = None,
    crds: Annotated[
        Path | None, typer.Option(help="Folder of KubeRay CRD YAML files ($VRSTACK_KUBERAY_CRDS).")
    ] = None,
) -> None:
    """Check manifests offline: CRD schemas, core schemas, serveConfigV2, quantities, names."""
    from app.k8s.validate import file_errors

    env_dir = os.environ.get("VRSTACK_KUBERAY_CRDS")
    crd_dir = crds or (Path(env_dir) if env_dir else None)
    if crd_dir is None:
        console.print("[yellow]no --crds folder: RayService schemas not checked[/]")
    files = list(paths or sorted(OUT_DIR.rglob("*.yaml")))
    errors = [e for path in files for e in file_errors(path, crd_dir)]
    for error in errors:
        console.print(error, markup=False, highlight=False, soft_wrap=True)
    if errors:
        raise typer.Exit(1)
    console.print(f"[green]✓[/] {len(files)} file(s) valid")


def _documents(target: str) -> list[dict[str, Any]]:
    """Documents of a serve config (rendered), a manifest file, or a RayService name."""
    from app.k8s.options import RenderOptions
    from app.k8s.render import default_name, render_documents

    path = Path(target)
    if path.is_file():
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
        if docs and "applications" in docs[0]:
            from app.serve_config import read_serve_config

            try:
                loaded = read_serve_config(path)
                return render_documents(loaded, RenderOptions(name=default_name(path)))
            except (ConfigError, ValueError) as exc:
                raise _die(str(exc), 2) from None
        return docs
    name = target
    return [
        {"kind": "PersistentVolumeClaim", "metadata": {"name": f"{name}-model-cache"}},
        {"kind": "RayService", "metadata": {"name": name}},
        {"kind": "Service", "metadata": {"name": f"{name}-router-service"}},
        {"kind": "PodMonitor", "metadata": {"name": f"{name}-ray"}},
    ]


def _cluster(kubeconfig: str | None, context: str | None, namespace: str | None):
    from app.k8s.client import Cluster, K8sError, connect

    try:
        return Cluster(connect(kubeconfig, context, namespace))
    except K8sError as exc:
        raise _die(str(exc)) from None


def _rayservice_name(documents: list[dict[str, Any]]) -> str:
    return next(d["metadata"]["name"] for d in documents if d["kind"] == "RayService")


@k8s_cli.command()
def apply(
    target: Annotated[str, typer.Argument(help="A serve config or a kuberay/X.yaml manifest.")],
    kubeconfig: Kubeconfig = None,
    context: Context = None,
    namespace: Namespace = None,
    wait: Annotated[bool, typer.Option(help="Wait for Ready afterwards.")] = False,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for Ready.")] = 900,
) -> None:
    """Create or patch the RayService and its companions (kubectl apply, with clear errors)."""
    from app.k8s.client import K8sError

    documents = _documents(target)
    cluster = _cluster(kubeconfig, context, namespace)
    try:
        for line in cluster.apply(documents):
            console.print(line, markup=False, highlight=False)
    except K8sError as exc:
        raise _die(str(exc)) from None
    if wait:
        _status(cluster, _rayservice_name(documents), timeout=timeout, poll=5)


def _status(cluster, name: str, *, timeout: float, poll: float) -> None:
    from app.k8s.client import K8sError, endpoints

    try:
        with console.status(f"waiting for RayService {name} to be Ready...") as spinner:
            state = cluster.wait_ready(
                name,
                timeout_s=timeout,
                poll_s=poll,
                on_update=lambda s: spinner.update(f"{name}: {s.summary()}"),
            )
    except K8sError as exc:
        raise _die(str(exc)) from None
    console.print(f"[green]✓[/] {name}: {state.summary()}")
    for label, where in endpoints(name, cluster.conn.namespace).items():
        typer.echo(f"{label}: {where}")


@k8s_cli.command()
def status(
    target: Annotated[str, typer.Argument(help="RayService name, serve config or manifest.")],
    kubeconfig: Kubeconfig = None,
    context: Context = None,
    namespace: Namespace = None,
    wait: Annotated[bool, typer.Option(help="Wait for Ready (else print once).")] = True,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for Ready.")] = 900,
    poll: Annotated[float, typer.Option(help="Seconds between polls.")] = 5,
) -> None:
    """Show the RayService's conditions and applications; wait for Ready; print the endpoint."""
    from app.k8s.client import K8sError, ServiceState

    name = _rayservice_name(_documents(target))
    cluster = _cluster(kubeconfig, context, namespace)
    if wait:
        _status(cluster, name, timeout=timeout, poll=poll)
        return
    try:
        state = ServiceState.of(cluster.rayservice(name))
    except K8sError as exc:
        raise _die(str(exc)) from None
    typer.echo(f"{name}: {state.summary()}")
    if not state.ready:
        raise typer.Exit(3)


@k8s_cli.command()
def delete(
    target: Annotated[str, typer.Argument(help="RayService name, serve config or manifest.")],
    kubeconfig: Kubeconfig = None,
    context: Context = None,
    namespace: Namespace = None,
    delete_cache: Annotated[bool, typer.Option(help="Also delete the model-cache PVC.")] = False,
) -> None:
    """Delete the RayService and its companions (the model cache is kept unless asked)."""
    from app.k8s.client import K8sError

    documents = _documents(target)
    cluster = _cluster(kubeconfig, context, namespace)
    try:
        cluster.require_kuberay()
        for line in cluster.delete(documents, keep_cache=not delete_cache):
            console.print(line, markup=False, highlight=False)
    except K8sError as exc:
        raise _die(str(exc)) from None


def import_values_command(
    values: Annotated[Path, typer.Argument(help="production-stack Helm values file.")],
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Serve config to write (else stdout).")
    ] = None,
    k8s_output: Annotated[
        Path | None, typer.Option("--k8s-output", help="Also write the RayService manifests.")
    ] = None,
    name: Annotated[
        str, typer.Option(help="RayService name (production-stack's release).")
    ] = "vllm",
) -> None:
    """Convert production-stack Helm values into a serve config (and a RayService)."""
    from app.k8s.options import RenderOptions
    from app.k8s.render import dump_documents, render_documents
    from app.k8s.values import dump_serve_config, import_values
    from app.serve_config import read_serve_config

    try:
        raw = yaml.safe_load(values.read_text()) or {}
        imported = import_values(raw)
    except (OSError, yaml.YAMLError, ConfigError) as exc:
        raise _die(f"{values}: {exc}", 2) from None
    for warning in imported.warnings:
        console.print(f"[yellow]warning:[/] {warning}", highlight=False, soft_wrap=True)
    text = dump_serve_config(imported, str(values))
    if output is None:
        sys.stdout.write(text)
    else:
        output.write_text(text)
        console.print(f"[green]✓[/] {output}")
    if k8s_output is not None:
        source = output or values.with_suffix(".serve.yaml")
        if output is None:
            source.write_text(text)
        loaded = read_serve_config(source)
        options = RenderOptions(name=name)  # each model's secrets are in the serve config
        k8s_output.write_text(dump_documents(render_documents(loaded, options), str(source)))
        console.print(f"[green]✓[/] {k8s_output}")
