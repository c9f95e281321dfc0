"""`vrstack status`: a live table of the running stack (GET /status of the ingress).

One row per engine replica: its model, in-flight and queued requests, running requests, KV-cache
usage and prefix-cache hit rate (the engines' own numbers, as last reported to Ray Serve); a
model without replica info (not ready, or no request routed yet) gets one row of its own.
"""

from __future__ import annotations

import time
from typing import Annotated, Any

import httpx
import typer
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

DEFAULT_URL = "http://127.0.0.1:8000"


def fetch(url: str, *, api_key: str | None = None, timeout_s: float = 5.0) -> dict[str, Any]:
    """The stack's GET /status body."""
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    response = httpx.get(f"{url.rstrip('/')}/status", headers=headers, timeout=timeout_s)
    response.raise_for_status()
    return response.json()


def _percent(value: Any) -> str:
    return "-" if value is None else f"{100 * float(value):.1f}%"


def _count(value: Any) -> str:
    return "-" if value is None else str(int(value))


def render(status: dict[str, Any], url: str) -> Table:
    """The status as a rich table."""
    in_flight = sum((status.get("ingress_in_flight") or {}).values())
    table = Table(
        title=f"vllm-ray-stack at {url}",
        caption=f"ingress: {in_flight} request(s) in flight · {time.strftime('%H:%M:%S')}",
    )
    for column, justify in (
        ("model", "left"),
        ("ready", "center"),
        ("replica", "left"),
        ("in flight", "right"),
        ("running", "right"),
        ("queued", "right"),
        ("KV usage", "right"),
        ("prefix hit rate", "right"),
    ):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for model in status.get("models", []):
        ready = Text("yes", style="green") if model.get("ready") else Text("no", style="red")
        name = model["name"]
        if model.get("aliases"):
            name += f" ({', '.join(model['aliases'])})"
        replicas = model.get("replicas") or {}
        if not replicas:
            running = model.get("running_replicas", 0)
            table.add_row(name, ready, f"{running} running", "-", "-", "-", "-", "-")
            continue
        for index, (replica, stats) in enumerate(sorted(replicas.items())):
            table.add_row(
                name if index == 0 else "",
                ready if index == 0 else "",
                replica,
                _count(stats.get("in_flight")),
                _count(stats.get("running")),
                _count(stats.get("queued")),
                _percent(stats.get("kv_usage")),
                _percent(stats.get("prefix_cache_hit_rate")),
            )
    return table


def _view(url: str, api_key: str | None) -> Table | Group:
    try:
        return render(fetch(url, api_key=api_key), url)
    except (httpx.HTTPError, ValueError) as exc:
        return Group(Text(f"{url}: {type(exc).__name__}: {exc}", style="red"))


def status_command(
    url: Annotated[str, typer.Option(help="The stack's URL.")] = DEFAULT_URL,
    watch: Annotated[bool, typer.Option("--watch", "-w", help="Refresh until Ctrl-C.")] = False,
    interval: Annotated[float, typer.Option(help="Seconds between refreshes (--watch).")] = 2.0,
    api_key: Annotated[
        str | None, typer.Option(envvar="VRSTACK_API_KEY", help="Bearer key, if auth is on.")
    ] = None,
) -> None:
    """Models, replicas, in-flight and queued requests, KV usage and prefix-cache hit rate."""
    console = Console()
    if not watch:
        try:
            console.print(render(fetch(url, api_key=api_key), url))
        except (httpx.HTTPError, ValueError) as exc:
            Console(stderr=True).print(f"[red]cannot read {url}/status:[/] {exc}")
            raise typer.Exit(1) from None
        return
    with Live(_view(url, api_key), console=console, auto_refresh=False) as live:
        try:
            while True:
                time.sleep(interval)
                live.update(_view(url, api_key), refresh=True)
        except KeyboardInterrupt:
            pass
