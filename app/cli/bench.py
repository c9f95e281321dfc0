"""`vrstack bench`: an OpenAI-API load generator (fixed, multi-round QA or trace replay)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

console = Console(stderr=True)


class Mode(str, Enum):
    fixed = "fixed"
    qa = "qa"


class Endpoint(str, Enum):
    chat = "chat"
    completions = "completions"


def bench(
    mode: Annotated[Mode, typer.Option(help="Workload: fixed concurrency or multi-round QA.")] = (
        Mode.fixed
    ),
    trace: Annotated[
        Path | None,
        typer.Option(exists=True, dir_okay=False, help="Replay a JSONL trace at its timestamps."),
    ] = None,
    url: Annotated[str, typer.Option(help="Base URL of the OpenAI API.")] = "http://127.0.0.1:8000",
    model: Annotated[
        str | None, typer.Option(help="Model name (default: 'default', or the trace's).")
    ] = None,
    api_key: Annotated[
        str | None, typer.Option(envvar="VRSTACK_API_KEY", help="Bearer token.")
    ] = None,
    endpoint: Annotated[Endpoint, typer.Option(help="chat or completions.")] = Endpoint.chat,
    stream: Annotated[bool, typer.Option("--stream/--no-stream", help="Stream (SSE).")] = True,
    timeout: Annotated[float, typer.Option(help="Per-request timeout in seconds.")] = 300.0,
    max_duration: Annotated[
        float | None,
        typer.Option(help="Hard stop after this many seconds; in-flight requests are dropped."),
    ] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write results as JSON.")] = None,
    markdown_out: Annotated[
        Path | None, typer.Option("--markdown", help="Write a markdown table.")
    ] = None,
    seed: Annotated[int, typer.Option(help="Random seed of prompts and arrivals.")] = 0,
    concurrency: Annotated[int, typer.Option(help="fixed: concurrent workers.")] = 8,
    requests: Annotated[int, typer.Option(help="fixed: total requests.")] = 64,
    prompt_len: Annotated[int, typer.Option(help="fixed: prompt length in words (~tokens).")] = 256,
    max_tokens: Annotated[int, typer.Option(help="fixed: max_tokens of each request.")] = 128,
    users: Annotated[int, typer.Option(help="qa: users (conversations).")] = 40,
    rounds: Annotated[int, typer.Option(help="qa: rounds per user.")] = 6,
    qps: Annotated[float, typer.Option(help="qa: Poisson arrival rate of users' starts.")] = 4.0,
    system_prompt_len: Annotated[int, typer.Option(help="qa: shared system prompt length.")] = 1000,
    history_len: Annotated[
        int, typer.Option(help="qa: each user's initial history length.")
    ] = 2000,
    question_len: Annotated[int, typer.Option(help="qa: each round's question length.")] = 50,
    answer_len: Annotated[int, typer.Option(help="qa: max_tokens of each answer.")] = 100,
) -> None:
    """Load an OpenAI-compatible endpoint; report TTFT, ITL, end-to-end latency, throughput."""
    from app.bench.load import BenchConfig

    cfg = BenchConfig(
        url=url,
        model=model or "default",
        api_key=api_key,
        endpoint=endpoint.value,
        stream=stream,
        timeout=timeout,
        max_duration=max_duration,
        seed=seed,
    )
    if trace is not None:
        plan = _trace_plan(trace, model_override=model is not None)
    elif mode is Mode.qa:
        qa = {"users": users, "rounds": rounds, "qps": qps}
        lengths = {"system_prompt_len": system_prompt_len, "history_len": history_len}
        lengths |= {"question_len": question_len, "answer_len": answer_len}
        plan = _Plan({"mode": "qa", **qa, **lengths}, users * rounds, _qa_runner(qa, lengths))
    else:
        shape = {"concurrency": concurrency, "requests": requests}
        shape |= {"prompt_len": prompt_len, "max_tokens": max_tokens}
        plan = _Plan({"mode": "fixed", **shape}, requests, _fixed_runner(shape))
    result = _run_with_progress(cfg, plan)
    _report(cfg, plan, result, json_out, markdown_out)


OnDone = Callable[[Any], None]
Runner = Callable[[Any, OnDone], Coroutine[Any, Any, Any]]


@dataclass(frozen=True)
class _Plan:
    """What one `bench` run sends: its description (for the report), size and driver."""

    workload: dict[str, Any]
    total: int
    run: Runner


def _trace_plan(path: Path, *, model_override: bool) -> _Plan:
    from app.bench.load import run_trace
    from app.lab.trace import read_trace

    try:
        requests = read_trace(path)
    except ValueError as exc:
        console.print(str(exc), markup=False)
        raise typer.Exit(2) from None

    def run(cfg: Any, on_done: OnDone) -> Coroutine[Any, Any, Any]:
        return run_trace(cfg, requests, on_done, model_override=model_override)

    workload = {"mode": "trace", "trace": str(path), "requests": len(requests)}
    return _Plan(workload, len(requests), run)


def _qa_runner(qa: dict[str, Any], lengths: dict[str, int]) -> Runner:
    from app.bench.load import run_qa

    return lambda cfg, on_done: run_qa(cfg, **qa, **lengths, on_done=on_done)


def _fixed_runner(shape: dict[str, int]) -> Runner:
    from app.bench.load import run_fixed

    return lambda cfg, on_done: run_fixed(cfg, **shape, on_done=on_done)


def _run_with_progress(cfg: Any, plan: _Plan) -> Any:
    """Run the plan with a progress bar counting answered requests and errors."""
    progress = Progress(
        TextColumn("[bold]bench[/] {task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("errors {task.fields[errors]}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )
    task = progress.add_task(plan.workload["mode"], total=plan.total, errors=0)
    errors = 0

    def on_done(record: Any) -> None:
        nonlocal errors
        errors += not record.ok
        progress.update(task, advance=1, errors=errors)

    with progress:
        return asyncio.run(plan.run(cfg, on_done))


def _report(
    cfg: Any, plan: _Plan, result: Any, json_out: Path | None, markdown_out: Path | None
) -> None:
    """Print the markdown table; write it and the JSON results where asked."""
    from app.bench.summary import markdown, summarize

    figures = summarize(result.records, result.duration_s)
    figures["planned"] = result.planned
    figures["stopped_early"] = result.stopped_early
    report = markdown(figures, title=f"vrstack bench ({plan.workload['mode']})")
    typer.echo(report)
    if result.stopped_early:
        console.print(f"[yellow]stopped at --max-duration {cfg.max_duration}s[/]")
    if json_out is not None:
        doc = {
            "config": {**cfg.to_json(), **plan.workload},
            "summary": figures,
            "records": [r.to_json() for r in result.records],
        }
        json_out.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    if markdown_out is not None:
        markdown_out.write_text(report, encoding="utf-8")
