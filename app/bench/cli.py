"""`vrstack bench`: an OpenAI-API load generator (fixed, multi-round QA or trace replay)."""

from __future__ import annotations

import asyncio
import json
from enum import Enum
from pathlib import Path
from typing import Annotated

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
    from app.bench import load, stats

    cfg = load.BenchConfig(
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
        from app.lab.trace import read_trace

        try:
            trace_reqs = read_trace(trace)
        except ValueError as exc:
            console.print(str(exc), markup=False)
            raise typer.Exit(2) from None
        workload = {"mode": "trace", "trace": str(trace), "requests": len(trace_reqs)}
        total = len(trace_reqs)
    elif mode is Mode.qa:
        workload = {
            "mode": "qa",
            "users": users,
            "rounds": rounds,
            "qps": qps,
            "system_prompt_len": system_prompt_len,
            "history_len": history_len,
            "question_len": question_len,
            "answer_len": answer_len,
        }
        total = users * rounds
    else:
        workload = {
            "mode": "fixed",
            "concurrency": concurrency,
            "requests": requests,
            "prompt_len": prompt_len,
            "max_tokens": max_tokens,
        }
        total = requests

    progress = Progress(
        TextColumn("[bold]bench[/] {task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("errors {task.fields[errors]}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )
    task = progress.add_task(workload["mode"], total=total, errors=0)
    errors = 0

    def on_done(rec: stats.RequestRecord) -> None:
        nonlocal errors
        errors += not rec.ok
        progress.update(task, advance=1, errors=errors)

    with progress:
        if trace is not None:
            coro = load.run_trace(cfg, trace_reqs, on_done, model_override=model is not None)
        elif mode is Mode.qa:
            coro = load.run_qa(
                cfg,
                users,
                rounds,
                qps,
                system_prompt_len,
                history_len,
                question_len,
                answer_len,
                on_done,
            )
        else:
            coro = load.run_fixed(cfg, concurrency, requests, prompt_len, max_tokens, on_done)
        result = asyncio.run(coro)

    summary = stats.summarize(result.records, result.duration_s)
    summary["planned"] = result.planned
    summary["stopped_early"] = result.stopped_early
    report = stats.markdown(summary, title=f"vrstack bench ({workload['mode']})")
    typer.echo(report)
    if result.stopped_early:
        console.print(f"[yellow]stopped at --max-duration {max_duration}s[/]")
    if json_out is not None:
        doc = {
            "config": {**cfg.to_json(), **workload},
            "summary": summary,
            "records": [r.to_json() for r in result.records],
        }
        json_out.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    if markdown_out is not None:
        markdown_out.write_text(report, encoding="utf-8")
