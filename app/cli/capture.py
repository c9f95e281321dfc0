"""`vrstack capture`: download the traffic a stack recorded (`capture:` in its config) as a
trace file for `vrstack lab --trace` and `benchmarks.peer_bench --trace`.

Without `--seconds`, everything the stack keeps; with it, only what arrives in the next N
seconds (timed by the stack's clock, waiting one flush interval more for the last records).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich.console import Console

from app.cli.status import DEFAULT_URL
from app.cli.usage import error_message


class CaptureUnavailable(Exception):
    """The stack could not be read: not reachable, or an error answer (its message)."""


def _get(
    url: str, path: str, api_key: str | None, params: dict[str, Any] | None = None
) -> httpx.Response:
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    target = f"{url.rstrip('/')}{path}"
    try:
        response = httpx.get(target, headers=headers, params=params, timeout=60.0)
    except httpx.HTTPError as exc:
        raise CaptureUnavailable(f"cannot reach {target}: {exc or type(exc).__name__}") from None
    if response.status_code != 200:
        message = error_message(response)
        raise CaptureUnavailable(f"{target} answered {response.status_code}: {message}")
    return response


def capture_status(url: str, api_key: str | None = None) -> dict[str, Any]:
    """The stack's GET /capture/status body."""
    return _get(url, "/capture/status", api_key).json()


def download(url: str, out: Path, api_key: str | None = None, since: float = 0.0) -> int:
    """Write the stack's recorded requests from `since` (its epoch seconds) to `out`; their
    count."""
    response = _get(url, "/capture", api_key, {"since": since} if since else None)
    out.write_bytes(response.content)
    return int(response.headers.get("x-vrstack-capture-records", "0"))


def capture_command(
    out: Annotated[Path, typer.Option("--out", "-o", help="Trace file (JSONL) to write.")],
    url: Annotated[str, typer.Option(help="The stack's URL.")] = DEFAULT_URL,
    api_key: Annotated[
        str | None, typer.Option(envvar="VRSTACK_API_KEY", help="Bearer key, if auth is on.")
    ] = None,
    seconds: Annotated[
        float | None,
        typer.Option(min=0, help="Record the next N seconds only (else all the stack keeps)."),
    ] = None,
) -> None:
    """Download the requests a stack recorded as a trace file for `vrstack lab --trace`."""
    console = Console(stderr=True)
    try:
        since = 0.0
        if seconds is not None:
            status = capture_status(url, api_key)
            since = float(status["now"])
            wait = seconds + float(status.get("flush_s", 1.0)) + 0.5
            with console.status(f"recording for {seconds:g} s..."):
                time.sleep(wait)
        count = download(url, out, api_key, since)
    except (CaptureUnavailable, KeyError, ValueError) as exc:
        console.print(f"[red]capture:[/] {exc}", highlight=False)
        raise typer.Exit(1) from None
    console.print(f"wrote {count} requests to {out}; replay: vrstack lab --trace {out}")
