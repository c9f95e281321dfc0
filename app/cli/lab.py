"""`vrstack lab`: replay a trace against simulated vLLM replicas under routing policies."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.table import Table

from app.lab.figures import LabFigures
from app.lab.kv_feed import KvFeedSettings
from app.lab.run import LAB_POLICIES, run_lab
from app.lab.simulator import SimSettings
from app.lab.trace import TraceRequest, read_trace, write_trace
from app.lab.workloads import WORKLOADS


def _number(value: str) -> float | int | str:
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def lab(
    trace: Annotated[Path | None, typer.Option(help="JSONL trace file (see docs).")] = None,
    workload: Annotated[
        str | None, typer.Option(help=f"Generate a trace: {', '.join(WORKLOADS)}.")
    ] = None,
    param: Annotated[
        list[str] | None,
        typer.Option("--param", "-p", help="Generator parameter NAME=VALUE (repeatable)."),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed for generators and random policies.")] = 0,
    save_trace: Annotated[Path | None, typer.Option(help="Write the generated trace here.")] = None,
    replicas: Annotated[int, typer.Option(min=1, help="Simulated replicas.")] = 4,
    cache_blocks: Annotated[
        int, typer.Option(min=1, help="Prefix cache per replica, in blocks.")
    ] = 2048,
    block_size: Annotated[int, typer.Option(min=1, help="Tokens per KV block.")] = 16,
    max_concurrency: Annotated[int, typer.Option(min=1, help="Requests per replica.")] = 32,
    prefill_cost: Annotated[float, typer.Option(help="Seconds per uncached token.")] = 0.0002,
    decode_cost: Annotated[float, typer.Option(help="Seconds per output token.")] = 0.01,
    policy: Annotated[
        list[str] | None,
        typer.Option(help=f"Policy (repeatable) or 'all': {', '.join(LAB_POLICIES)}."),
    ] = None,
    kv_event_delay: Annotated[
        float,
        typer.Option(min=0.0, help="kv policy: seconds from a replica's KV events to the router."),
    ] = 0.05,
    kv_event_loss: Annotated[
        float,
        typer.Option(min=0.0, max=1.0, help="kv policy: fraction of event batches dropped."),
    ] = 0.0,
    kv_replay: Annotated[
        bool,
        typer.Option(
            "--kv-replay/--no-kv-replay",
            help="kv policy: recover a lost batch by replay (after one more delay), or lose it.",
        ),
    ] = True,
    drift_every: Annotated[
        int, typer.Option(min=1, help="Sample the index drift every N decisions.")
    ] = 1,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    tenants: Annotated[
        bool,
        typer.Option(
            "--tenants",
            help="Compare tenant admission rules in the noisy-neighbour scenario instead "
            "(uses --replicas, --seed, --json and --param NAME=VALUE of the scenario).",
        ),
    ] = False,
) -> None:
    """Replay a trace on simulated vLLM replicas (a simulator, not engines) and compare policies."""
    if tenants:
        _tenants(param, seed, replicas, as_json)
        return
    if (trace is None) == (workload is None):
        _fail("give exactly one of --trace FILE or --workload NAME")
    requests = _read(trace) if trace is not None else _generate(workload or "", param, seed)
    if workload is not None and save_trace is not None:
        write_trace(save_trace, requests)
    names = list(LAB_POLICIES) if not policy or "all" in policy else policy
    settings = SimSettings(
        cache_blocks=cache_blocks,
        block_size=block_size,
        max_concurrency=max_concurrency,
        prefill_cost=prefill_cost,
        decode_cost=decode_cost,
    )
    feed = KvFeedSettings(delay_s=kv_event_delay, loss=kv_event_loss, replay=kv_replay)
    try:
        results = run_lab(
            requests, names, replicas, settings, seed=seed, kv_feed=feed, drift_every=drift_every
        )
    except ValueError as exc:
        _fail(str(exc))
    if as_json:
        source = str(trace) if trace else workload
        out = _as_json(results, source, len(requests), replicas, settings)
        if "kv" in names:
            out["kv_feed"] = _feed_json(feed)
        typer.echo(json.dumps(out))
    else:
        _print_table(results, len(requests), replicas)
        _print_drift(results, feed)


def _fail(message: str) -> NoReturn:
    Console(stderr=True).print(message, markup=False)
    raise typer.Exit(2)


def _read(path: Path) -> list[TraceRequest]:
    try:
        return read_trace(path)
    except (OSError, ValueError) as exc:
        _fail(f"{path}: {exc}")


def _generate(name: str, params: list[str] | None, seed: int) -> list[TraceRequest]:
    """A generated trace; `params` are the generator's NAME=VALUE settings."""
    gen = WORKLOADS.get(name)
    if gen is None:
        _fail(f"unknown workload {name!r}; allowed: {', '.join(WORKLOADS)}")
    kwargs: dict[str, float | int | str] = {}
    for item in params or []:
        key, _, value = item.partition("=")
        kwargs[key.replace("-", "_")] = _number(value)
    try:
        return gen(seed=seed, **kwargs)
    except TypeError as exc:
        _fail(f"bad --param: {exc}")


def _as_json(
    results: list[LabFigures], source: str | None, requests: int, replicas: int, s: SimSettings
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "simulated": True,
        "trace": source,
        "requests": requests,
        "replicas": replicas,
        "cache_blocks": s.cache_blocks,
        "block_size": s.block_size,
        "oracle_hit_rate": round(results[0].oracle_hit_rate, 4) if results else None,
        "policies": {r.policy: r.to_json() for r in results},
    }
    if len(results) == 1:
        out.update(results[0].to_json())
    return out


def _print_table(results: list[LabFigures], requests: int, replicas: int) -> None:
    table = Table(title=f"routing lab (simulated): {requests} requests, {replicas} replicas")
    for col in ("policy", "hit", "hit/oracle", "TTFT p50", "TTFT p99", "req/s", "max/mean"):
        table.add_column(col, justify="left" if col == "policy" else "right")
    for r in results:
        table.add_row(
            r.policy,
            f"{r.hit_rate:.3f}",
            f"{r.hit_vs_oracle:.2f}",
            f"{r.ttft_p50_s * 1000:.0f} ms",
            f"{r.ttft_p99_s * 1000:.0f} ms",
            f"{r.throughput_rps:.2f}",
            f"{r.load_imbalance:.2f}",
        )
    Console().print(table)
    if results:
        Console().print(
            f"oracle hit rate (pooled cache, same capacity): {results[0].oracle_hit_rate:.3f}"
        )


def _feed_json(feed: KvFeedSettings) -> dict[str, Any]:
    return {"delay_s": feed.delay_s, "loss": feed.loss, "replay": feed.replay}


def _print_drift(results: list[LabFigures], feed: KvFeedSettings) -> None:
    """The indexed policies' drift from the simulated caches, and the kv feed's batches."""
    rows = [r for r in results if r.index_drift is not None]
    if not rows:
        return
    table = Table(title="index vs simulated caches (share of entries; mean over decisions / end)")
    for col in ("policy", "stale", "missing", "event batches"):
        table.add_column(col, justify="left" if col == "policy" else "right")
    for r in rows:
        d = r.index_drift or {}
        ev = r.kv_events
        table.add_row(
            r.policy,
            f"{d['stale_mean']:.3f} / {d['stale_end']:.3f}",
            f"{d['missing_mean']:.3f} / {d['missing_end']:.3f}",
            ""
            if ev is None
            else f"{ev['dropped']} of {ev['published']} lost, {ev['replayed']} replayed",
        )
    Console().print(table)
    if any(r.kv_events is not None for r in rows):
        Console().print(
            f"kv events: {feed.delay_s:g} s delay, {feed.loss:.1%} of batches lost, "
            f"replay {'on' if feed.replay else 'off'}",
            markup=False,
        )


def _tenants(params: list[str] | None, seed: int, replicas: int, as_json: bool) -> None:
    """`--tenants`: the noisy-neighbour comparison of admission rules (app.lab.tenants)."""
    from app.lab.tenants import Scenario, run_tenants_lab

    kwargs: dict[str, Any] = {"seed": seed, "replicas": replicas}
    for item in params or []:
        key, _, value = item.partition("=")
        kwargs[key.replace("-", "_")] = _number(value)
    try:
        lab, results = run_tenants_lab(Scenario(**kwargs))
    except TypeError as exc:
        _fail(f"bad --param: {exc}")
    if as_json:
        out = {
            "simulated": True,
            "capacity_units_per_s": round(lab.capacity_units_s, 1),
            "rates_rps": {k: round(v, 3) for k, v in lab.rates.items()},
            "rules": {r.rule: r.to_json() for r in results},
        }
        typer.echo(json.dumps(out))
        return
    sc = lab.scenario
    table = Table(
        title=f"tenant admission (simulated): {len(lab.requests)} requests, {sc.replicas} "
        f"replicas, {sc.duration_s:.0f} s, noisy tenant at "
        f"{max(t.multiple for t in sc.tenants):g}x its share"
    )
    columns = ("rule", "p99 ratio", "worst tenant", "p99 max", "unserved", "Jain", "noisy req/s")
    table.add_column("rule", no_wrap=True, min_width=16)
    for col in columns[1:]:
        table.add_column(col, justify="left" if col == "worst tenant" else "right")
    for r in results:
        table.add_row(
            r.rule,
            f"{r.worst_p99_ratio:.2f}x",
            r.worst_tenant,
            f"{max(r.others_p99_s.values()):.2f} s",
            f"{r.others_unserved:.1%}",
            f"{r.jain:.3f}",
            f"{r.noisy_rps:.2f}",
        )
    Console().print(table)
    Console().print(
        "p99 ratio: the other tenants' worst TTFT p99 with the noisy tenant / without it; "
        "p99 max: their largest TTFT p99 with it; unserved: their requests refused or expired; "
        "Jain: each tenant's weighted token service / its max-min fair allocation.",
        markup=False,
    )
