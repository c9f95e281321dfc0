"""`vrstack usage`: each tenant's usage across the cluster (GET /usage of the ingress).

One row per tenant, and one `keys` row for callers without a tenant: requests answered and
refused (with the quotas that refused them), prompt and output tokens, tokens charged today,
and the tenant's quotas. `--json` prints the ingress's answer as it is.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

import httpx
import typer
from rich.console import Console
from rich.table import Table

from app.cli.status import DEFAULT_URL

_QUOTA_NAMES = {
    "requests_per_second": "rps",
    "burst": "burst",
    "tokens_per_minute": "tpm",
    "tokens_per_day": "tpd",
    "max_concurrent": "concurrent",
}


class UsageUnavailable(Exception):
    """The stack could not be read: not reachable, or an error answer (its message)."""


def fetch(url: str, *, api_key: str | None = None, timeout_s: float = 10.0) -> dict[str, Any]:
    """The stack's GET /usage body; `UsageUnavailable` with a readable reason otherwise."""
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    target = f"{url.rstrip('/')}/usage"
    try:
        response = httpx.get(target, headers=headers, timeout=timeout_s)
    except httpx.HTTPError as exc:
        raise UsageUnavailable(f"cannot reach {target}: {exc or type(exc).__name__}") from None
    if response.status_code != 200:
        message = error_message(response)
        raise UsageUnavailable(f"{target} answered {response.status_code}: {message}")
    try:
        body = response.json()
    except ValueError:
        raise UsageUnavailable(f"{target} did not answer JSON") from None
    if not isinstance(body, dict) or not isinstance(body.get("tenants"), list):
        raise UsageUnavailable(f"{target} did not answer a usage table (is it vllm-ray-stack?)")
    return body


def error_message(response: httpx.Response) -> str:
    """An error answer's message (OpenAI's shape), else its start."""
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return response.text[:200] or response.reason_phrase


def _count(value: Any) -> str:
    return f"{int(value or 0):,}"


def _refused(row: dict[str, Any]) -> str:
    total = int(row.get("refused") or 0)
    by_quota = row.get("refused_by_quota") or {}
    if not total or not by_quota:
        return _count(total)
    return f"{total:,} (" + ", ".join(f"{q} {n:,}" for q, n in by_quota.items()) + ")"


def _quotas(quotas: dict[str, Any]) -> str:
    parts = [f"{_QUOTA_NAMES.get(k, k)} {v:g}" for k, v in quotas.items() if v is not None]
    return ", ".join(parts) or "-"


def render(usage: dict[str, Any], url: str) -> Table:
    """The usage as a rich table."""
    scope = usage.get("scope", "cluster")
    where = "all ingress replicas" if scope == "cluster" else "one ingress replica (no ledger)"
    table = Table(
        title=f"vllm-ray-stack usage at {url}",
        caption=f"since {usage.get('since', '?')} · {where}",
    )
    for column, justify in (
        ("tenant", "left"),
        ("requests", "right"),
        ("refused", "right"),
        ("prompt tokens", "right"),
        ("output tokens", "right"),
        ("tokens today", "right"),
        ("quotas", "left"),
    ):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for row in usage.get("tenants", []):
        name = str(row.get("tenant", "?"))
        if row.get("kind") == "keys":
            name = f"{name} (no tenant)"
        table.add_row(
            name,
            _count(row.get("requests")),
            _refused(row),
            _count(row.get("prompt_tokens")),
            _count(row.get("output_tokens")),
            _count(row.get("tokens_today")),
            _quotas(row.get("quotas") or {}),
        )
    return table


def usage_command(
    url: Annotated[str, typer.Option(help="The stack's URL.")] = DEFAULT_URL,
    api_key: Annotated[
        str | None, typer.Option(envvar="VRSTACK_API_KEY", help="Bearer key, if auth is on.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the JSON answer.")] = False,
) -> None:
    """Per-tenant usage across the cluster: requests, refusals, tokens, quotas."""
    try:
        usage = fetch(url, api_key=api_key)
    except UsageUnavailable as exc:
        Console(stderr=True).print(f"[red]usage:[/] {exc}", highlight=False)
        raise typer.Exit(1) from None
    if as_json:
        typer.echo(json.dumps(usage, indent=2))
        return
    Console().print(render(usage, url))
