"""The `vrstack` command. Thin: each command delegates to a module of `app`."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from app.cli.bench import bench
from app.cli.capture import capture_command
from app.cli.k8s import import_values_command, k8s_cli
from app.cli.lab import lab
from app.cli.status import status_command
from app.cli.usage import usage_command
from app.config import ConfigError
from app.serve_config import read_serve_config

cli = typer.Typer(help="vllm-ray-stack: vLLM on Ray Serve and KubeRay.", no_args_is_help=True)
console = Console(stderr=True)
cli.add_typer(k8s_cli, name="k8s")
cli.command("import-values")(import_values_command)
ConfigArg = Annotated[Path, typer.Argument(help="A serve config file (serve run format).")]


def _load(path: Path):
    try:
        return read_serve_config(path)
    except ConfigError as exc:
        console.print(str(exc), markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None


@cli.command()
def validate(config: ConfigArg) -> None:
    """Check a serve config file; exit 2 with each bad field named."""
    loaded = _load(config)
    models = ", ".join(m.name for app in loaded.apps for m in app.config.models)
    console.print(f"[green]✓[/] {config}: {len(loaded.apps)} application(s); models: {models}")


@cli.command("prepare-model")
def prepare_model(name: str = typer.Argument("smollm2", help="Embedded model name.")) -> None:
    """Convert an embedded model to a Hugging Face folder in the cache (once)."""
    from app.engines import embedded

    with console.status(f"Preparing embedded model {name}..."):
        path = embedded.prepare(name)
    typer.echo(path)


@cli.command()
def up(
    config: ConfigArg,
    num_cpus: int = typer.Option(8, help="Logical CPUs of the local Ray head (> cores is fine)."),
    timeout: float = typer.Option(900, help="Seconds to wait for every model to be ready."),
    keep_ray: bool = typer.Option(False, help="Leave the Ray head running on exit."),
) -> None:
    """Start a local Ray head if none runs, then `serve run CONFIG` in the foreground.
    Exits 2 at once when the head it started cannot hold a model (a GPU config without GPU)."""
    from app import launcher
    from app.engines.embedded import cache_root
    from app.ray_internals import use_token_auth_if_available
    from app.stack_env import HIGH_THROUGHPUT, local_env, new_run

    loaded = _load(config)
    use_token_auth_if_available()  # as `ray start` will: `serve run --address` must match it
    run = new_run()
    env = local_env(run)
    launcher.prepare_models_in_background(loaded, env)  # overlaps the Ray head and `serve run`
    address = launcher.running_cluster()
    started_ray = address is None
    try:
        if address is None:
            try:
                address = launcher.start_ray_head(num_cpus, env)
            except launcher.RayHeadFailed as exc:
                console.print(str(exc), markup=False, highlight=False, soft_wrap=True)
                raise typer.Exit(1) from None
        else:
            flags = " ".join(f"{k}={v}" for k, v in HIGH_THROUGHPUT.items())
            console.print(
                f"Ray is already running at {address}: its processes keep the environment they "
                f"started with (for Ray Serve's high-throughput path, start Ray with {flags})"
            )
        try:
            nodes = launcher.cluster_nodes(address)
        except launcher.ClusterUnreachable as exc:
            console.print(str(exc), markup=False, highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
        problems = launcher.check_resources(loaded, nodes)
        if problems and started_ray:  # one machine, no autoscaler: it would wait forever
            console.print("Nothing deployed: this machine cannot run the config.")
            raise typer.Exit(2)
        if problems:
            console.print("Deploying anyway: the cluster may grow (an autoscaler adds nodes).")
        log = cache_root() / "logs" / f"serve-{time.strftime('%Y%m%d-%H%M%S')}.log"
        code = launcher.serve_foreground(
            loaded, address=address, log_path=log, timeout_s=timeout, env=env
        )
    finally:
        if started_ray and not keep_ray:
            launcher.stop_ray(run)
    raise typer.Exit(code)


cli.command("lab")(lab)
cli.command("status")(status_command)
cli.command("usage")(usage_command)
cli.command("bench")(bench)
cli.command("capture")(capture_command)


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
