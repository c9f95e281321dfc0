"""The one-command GPU check (`benchmarks.gpu_check`): its pure parts, its process sweep, its
answer on a machine without a GPU, and its API checks and LMCache procedure against the CPU
stack (the smollm2 config on the tests' Ray cluster, reached with `--base-url`)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import yaml
from rich.console import Console

from app.bench.summary import RequestRecord
from app.config import load_config
from app.engines.llm_config import engine_env, engine_kwargs
from app.stack_env import sweep
from benchmarks import engines
from benchmarks.gpu_check import (
    API,
    BENCH,
    BENCH_TARGETS,
    EXIT_NO_GPU,
    LMCACHE,
    MARK,
    Budget,
    Check,
    CheckFailed,
    EvictionPlan,
    OffloadSamples,
    OutOfTime,
    Scope,
    completion_problem,
    exit_code,
    gpu_problem,
    judge_bench,
    judge_offload,
    last_lines,
    main,
    measure_offload,
    model_list_problem,
    no_chat_template,
    offload_config,
    plan_eviction,
    plan_groups,
    port_taken,
    stream_text,
    summary,
    table,
)
from tests.conftest import SERVE_CONFIGS

CPU_CONFIG = SERVE_CONFIGS / "smollm2-cpu.yaml"
GPU_CONFIG = SERVE_CONFIGS / "opt125m.yaml"


# -- summary ------------------------------------------------------------------------------------
def test_summary_counts_each_status_and_fails_on_any_failure() -> None:
    checks = [Check("a", "pass", "1 ms"), Check("b", "skip", detail="why")]
    assert exit_code(checks) == 0
    checks.append(Check("c", "fail", detail="broken"))
    report = json.loads(json.dumps(summary(checks, config="x.yaml")))
    assert report["exit_code"] == exit_code(checks) == 1 and report["passed"] is False
    assert report["counts"] == {"pass": 1, "fail": 1, "skip": 1}
    assert [c["name"] for c in report["checks"]] == ["a", "b", "c"]
    assert report["config"] == "x.yaml"


def test_table_shows_every_check_with_its_result() -> None:
    console = Console(record=True, width=200)
    console.print(table([Check("GET /models", "pass", "12 ms"), Check("bench", "fail", "", "x")]))
    text = console.export_text()
    assert "GET /models" in text and "✓ pass" in text and "12 ms" in text
    assert "bench" in text and "✗ FAIL" in text


# -- what runs ----------------------------------------------------------------------------------
GROUPS = ["api", "lmcache", "bench"]


def test_a_cpu_config_runs_the_api_checks_only() -> None:
    plan = plan_groups(GROUPS, on_gpu=False, base_url=None, gpu=None, lmcache=None)
    assert plan.api is None
    assert plan.lmcache is not None and plan.lmcache[0] == "skip" and "CPU" in plan.lmcache[1]
    assert plan.bench is not None and plan.bench[0] == "skip" and "CPU" in plan.bench[1]


def test_a_gpu_config_without_a_gpu_runs_nothing_unless_given_a_running_stack() -> None:
    plan = plan_groups(GROUPS, on_gpu=True, base_url=None, gpu="no GPU here", lmcache=None)
    assert plan.runs_nothing and plan.api == ("skip", "no GPU here")
    remote = plan_groups(GROUPS, on_gpu=True, base_url="http://h:1", gpu="no GPU", lmcache=None)
    assert remote.api is None and not remote.runs_nothing
    assert remote.lmcache is not None and "--base-url" in remote.lmcache[1]
    assert remote.bench is not None and "--base-url" in remote.bench[1]


def test_on_a_gpu_everything_runs_and_a_missing_lmcache_is_a_failure() -> None:
    plan = plan_groups(GROUPS, on_gpu=True, base_url=None, gpu=None, lmcache=None)
    assert (plan.api, plan.lmcache, plan.bench) == (None, None, None)
    missing = plan_groups(GROUPS, on_gpu=True, base_url=None, gpu=None, lmcache="not installed")
    assert missing.lmcache == ("fail", "not installed")
    only = plan_groups(["bench"], on_gpu=True, base_url=None, gpu=None, lmcache=None)
    assert only.bench is None and only.api == only.lmcache == ("skip", "not selected (--checks)")


def test_budget_caps_each_step_and_runs_out() -> None:
    budget = Budget(100.0)
    assert budget.cap(5.0) == 5.0 and 99 < budget.cap(500.0) <= 100
    with pytest.raises(OutOfTime, match="budget"):
        budget.cap(5.0, need=200.0)
    with pytest.raises(OutOfTime):
        Budget(0.0).cap(1.0)


# -- the LMCache check's sizes ------------------------------------------------------------------
@pytest.mark.parametrize(
    ("max_model_len", "block_size", "chunk_size"),
    [(2048, 16, 256), (4096, 16, 256), (1000, 32, 128), (8192, 16, 512)],
)
def test_eviction_plan_fits_the_context_and_overwrites_the_cache(
    max_model_len: int, block_size: int, chunk_size: int
) -> None:
    plan = plan_eviction(max_model_len, block_size=block_size, chunk_size=chunk_size)
    assert plan.prefix_tokens % chunk_size == 0 and plan.prefix_tokens >= 2 * chunk_size
    assert plan.prompt_tokens + plan.max_tokens <= max_model_len
    assert plan.prompt_tokens + plan.max_tokens + chunk_size > max_model_len  # the longest one
    # vLLM's own rule: one request of max_model_len fits (beside the null block)
    assert plan.capacity_tokens >= max_model_len
    assert plan.capacity_tokens == (plan.gpu_blocks - 1) * block_size
    fill = plan.fill_prompts * plan.prompt_tokens
    assert 2 * plan.capacity_tokens <= fill < 2 * plan.capacity_tokens + plan.prompt_tokens


def test_eviction_plan_refuses_a_context_shorter_than_two_chunks() -> None:
    with pytest.raises(ValueError, match="max_model_len 500"):
        plan_eviction(500, chunk_size=256)


def test_offload_config_turns_lmcache_on_and_sizes_the_kv_cache() -> None:
    raw = yaml.safe_load((SERVE_CONFIGS / "opt125m-autoscaling.yaml").read_text())
    before = json.dumps(raw, sort_keys=True)
    config, plan = offload_config(raw, trials=3)
    assert json.dumps(raw, sort_keys=True) == before  # the config itself is untouched
    (spec,) = load_config(config["applications"][0]["args"]).models
    assert spec.kv_offload is not None and spec.autoscaling is None and spec.replicas == 1
    kwargs = engine_kwargs(spec)
    assert kwargs["kv_transfer_config"]["kv_connector"] == "LMCacheConnectorV1"
    assert kwargs["num_gpu_blocks_override"] == plan.gpu_blocks
    assert kwargs["block_size"] == plan.block_size and kwargs["max_model_len"] == 2048
    assert engine_env(spec)["LMCACHE_CHUNK_SIZE"] == str(plan.chunk_size)
    assert plan.trials == 3 and plan.max_model_len == 2048


def test_offload_config_keeps_the_configured_offload_and_context() -> None:
    raw = yaml.safe_load(GPU_CONFIG.read_text())
    model = raw["applications"][0]["args"]["models"][0]
    model.update(max_model_len=1024, kv_offload={"cpu_gb": 2, "chunk_size": 128})
    config, plan = offload_config(raw)
    (spec,) = load_config(config["applications"][0]["args"]).models
    assert spec.kv_offload is not None and spec.kv_offload.cpu_gb == 2
    assert (plan.max_model_len, plan.chunk_size) == (1024, 128)


# -- judging the LMCache samples ----------------------------------------------------------------
PLAN = plan_eviction(2048, trials=3)


def samples(warm: float, cold: float, gpu: float, hits: int = 0) -> OffloadSamples:
    q = PLAN.prompt_tokens
    return OffloadSamples(
        cold=[cold, cold * 1.02, cold * 0.98] * 3, gpu_hit=[gpu] * 3, warm=[warm] * 3,
        resend_cache=[(q, hits)] * 3,
    )  # fmt: skip


def test_a_resent_prefix_faster_than_cold_and_missed_on_the_gpu_passes() -> None:
    check = judge_offload(samples(warm=0.020, cold=0.030, gpu=0.012), PLAN, min_gain=0.1)
    assert check.status == "pass", check
    assert check.data["gain"] == pytest.approx(1 - 0.020 / 0.030)
    assert check.data["resend_gpu_hit_fraction"] == [0.0] * 3


def test_a_resent_prefix_as_slow_as_cold_fails() -> None:
    check = judge_offload(samples(warm=0.029, cold=0.030, gpu=0.012), PLAN, min_gain=0.1)
    assert check.status == "fail" and "not 10% faster" in check.detail


def test_a_prefix_still_in_the_gpu_cache_fails_however_fast() -> None:
    hits = PLAN.prefix_tokens  # the whole prefix found on the GPU: nothing was evicted
    check = judge_offload(samples(0.012, 0.030, 0.012, hits=hits), PLAN, min_gain=0.1)
    assert check.status == "fail" and check.detail.startswith("not evicted")


def test_unverified_eviction_and_request_errors_fail() -> None:
    unread = samples(0.012, 0.030, 0.012)
    unread.resend_cache[1] = None
    assert "not verified" in judge_offload(unread, PLAN, 0.1).detail
    broken = samples(0.012, 0.030, 0.012)
    broken.errors.append("a 1808-token prompt: 503, no text")
    assert judge_offload(broken, PLAN, 0.1).detail == "a 1808-token prompt: 503, no text"


# -- judging the benchmark rows -----------------------------------------------------------------
def bench_report(failed_ours: int = 0) -> dict:
    """A report of `benchmarks.engines` for the check's small run, from request records."""
    args = engines.parser().parse_args(
        ["--targets", *BENCH_TARGETS, "--rounds", "1", "--serial", "4", "--concurrency", "2",
         "--requests", "2"]
    )  # fmt: skip
    targets = {name: engines.Target(name) for name in BENCH_TARGETS}
    for name, target in targets.items():
        for level, sent in ((engines.SERIAL, 4), (2, 4)):
            scale = 1.0 if name == "vllm" else 1.5
            recs = [
                RequestRecord(start=0.0, e2e=0.1 * scale, ttft=0.05 * scale, itl=[0.01] * 3,
                              output_tokens=4)
                for _ in range(sent)
            ]  # fmt: skip
            if name == "ours":
                for rec in recs[:failed_ours]:
                    rec.status = "503"
            target.records[level], target.durations[level] = recs, 1.0
    return json.loads(json.dumps(engines.build_report(targets, args)))


def test_bench_rows_pass_when_both_answer_everything_with_the_ratios_as_figures() -> None:
    report = bench_report()
    check = judge_bench(report)
    assert check.status == "pass", check
    expected = engines.ratios(report["pooled"]["2"])["ours"]["ttft_p50"]
    assert check.data["ratios"]["2"]["ours"]["ttft_p50"] == expected
    assert f"TTFT p50 x{expected:.2f}" in check.figure


def test_bench_rows_fail_on_an_unanswered_request_or_nothing_measured() -> None:
    check = judge_bench(bench_report(failed_ours=1))
    assert check.status == "fail" and "ours at" in check.detail and "503" in check.detail
    assert judge_bench({}).status == "fail"


# -- answer shapes ------------------------------------------------------------------------------
def test_shape_checks_name_what_is_wrong() -> None:
    card = {"id": "m", "object": "model", "created": 0, "owned_by": "x"}
    assert model_list_problem({"object": "list", "data": [card]}, {"m"}) is None
    assert "missing" in (model_list_problem({"object": "list", "data": [card]}, {"m", "n"}) or "")
    assert "OpenAI list" in (model_list_problem({"data": [card]}, {"m"}) or "")
    completion = {
        "id": "c", "object": "text_completion", "created": 0, "model": "m",
        "choices": [{"index": 0, "text": "hi", "finish_reason": "length"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 10, "total_tokens": 13},
    }  # fmt: skip
    assert completion_problem(completion, 10) is None
    assert "1..5" in (completion_problem(completion, 5) or "")
    assert "Completion" in (completion_problem({**completion, "choices": "x"}, 10) or "")
    with pytest.raises(CheckFailed, match="DONE"):
        stream_text(['data: {"object": "text_completion", "choices": []}'], chat=False)


def test_a_missing_chat_template_is_recognized_only_as_the_engines_400() -> None:
    error = {"message": "you must provide a chat template", "type": "BadRequestError",
             "param": None, "code": 400}  # fmt: skip
    assert no_chat_template(400, {"error": error})
    assert not no_chat_template(500, {"error": error})
    assert not no_chat_template(400, {"error": {**error, "message": "temperature"}})
    assert not no_chat_template(400, {"detail": "chat template"})


# -- processes ----------------------------------------------------------------------------------
def _sleeper_tree(env: dict[str, str]) -> subprocess.Popen:
    """A process in its own session with a child of its own, both carrying `env`."""
    code = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); time.sleep(120)"  # noqa: E501
    return subprocess.Popen([sys.executable, "-c", code], env={**os.environ, **env},
                            start_new_session=True)  # fmt: skip


def test_sweep_by_another_mark_ends_only_what_carries_it(tmp_path: Path) -> None:
    mine, other = _sleeper_tree({MARK: "run-a"}), _sleeper_tree({MARK: "run-b"})
    try:
        deadline = time.monotonic() + 20
        while len(psutil.Process(mine.pid).children()) < 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        left = sweep("run-a", mark=MARK, grace_s=0)
        assert len(left) == 2 and all(line.startswith(f"{sys.executable} -c ") for line in left)
        assert mine.wait(10) is not None
        assert other.poll() is None  # another run's processes live on
    finally:
        sweep("run-a", mark=MARK, grace_s=0)
        sweep("run-b", mark=MARK, grace_s=0)
        mine.wait(10)
        other.wait(10)


def test_last_lines_of_a_log_leave_out_traceback_frames(tmp_path: Path) -> None:
    log = tmp_path / "stack.log"
    frames = ["╭──── Traceback ────╮", "│ ❱ 571 │ raise X │", "╰───────────────────╯"]
    log.write_text("\n".join(["started", *frames, "", "RuntimeError: boom", "exit"]) + "\n")
    assert last_lines(log, n=2) == "RuntimeError: boom | exit"
    assert last_lines(log) == "started | RuntimeError: boom | exit"
    assert last_lines(tmp_path / "none.log") == ""


def test_a_listening_port_is_taken_until_closed() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        assert port_taken(port)
    assert not port_taken(port)


def test_scope_reports_what_outlived_a_step(tmp_path: Path) -> None:
    scope = Scope(tmp_path / "logs")
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"],
                             env=scope.env(), start_new_session=True)  # fmt: skip
    assert scope.env()["RAY_TMPDIR"] == str(scope.ray_tmp) and "RAY_ADDRESS" not in scope.env()
    scope.sweep("a step")
    assert child.wait(10) is not None
    check = scope.close(passed=True)
    assert check.status == "fail" and check.detail.startswith("a step: ")
    assert str(scope.ray_tmp) in check.detail and scope.ray_tmp.exists()
    shutil.rmtree(scope.ray_tmp)
    clean = Scope(tmp_path / "logs2")
    assert clean.close(passed=True).status == "pass" and not clean.ray_tmp.exists()


# -- the command without a GPU ------------------------------------------------------------------
def test_without_a_gpu_it_says_what_it_needs_and_exits_3_or_0(tmp_path: Path, capsys) -> None:
    if gpu_problem() is None:
        pytest.skip("this machine has a usable GPU")
    out = tmp_path / "summary.json"
    assert main(["--config", str(GPU_CONFIG), "--json", str(out)]) == EXIT_NO_GPU
    said = capsys.readouterr().out
    assert "needs an NVIDIA GPU" in said and "pip install -e '.[gpu]'" in said
    report = json.loads(out.read_text())
    assert {c["name"] for c in report["checks"]} == {API, LMCACHE, BENCH}
    assert {c["status"] for c in report["checks"]} == {"skip"}
    assert main(["--config", str(GPU_CONFIG), "--skip-without-gpu"]) == 0


def test_a_bad_config_exits_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("applications: []\n")
    assert main(["--config", str(bad)]) == 2


# -- against the CPU stack ----------------------------------------------------------------------
# The smollm2 config with the KV cache the LMCache check would give it (`plan_eviction`), minus
# LMCache (GPU only): the same engine serves the API checks and the eviction procedure.
CPU_PLAN = plan_eviction(512, block_size=32, chunk_size=64, trials=1)


@pytest.fixture(scope="module")
def smollm2(cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from tests.e2e.conftest import deploy, undeploy

    raw = yaml.safe_load(CPU_CONFIG.read_text())
    model = raw["applications"][0]["args"]["models"][0]
    model["max_model_len"] = CPU_PLAN.max_model_len
    model["engine_args"].update(
        block_size=CPU_PLAN.block_size, num_gpu_blocks_override=CPU_PLAN.gpu_blocks
    )
    config = tmp_path_factory.mktemp("gpu-check") / "smollm2-small-cache.yaml"
    config.write_text(yaml.safe_dump(raw))
    stack = deploy(cluster, config)
    yield stack.base_url
    undeploy(stack)


@pytest.mark.e2e
def test_api_checks_pass_on_the_cpu_stack_and_the_gpu_parts_say_why_not(
    smollm2: str, tmp_path: Path
) -> None:
    out = tmp_path / "summary.json"
    assert main(["--config", str(CPU_CONFIG), "--base-url", smollm2, "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    rows = {c["name"]: c for c in report["checks"]}
    api = [c for c in report["checks"] if c["name"] not in {LMCACHE, BENCH}]
    assert len(api) == 6 and all(c["status"] == "pass" for c in api), api
    assert "Paris" in rows["POST /v1/chat/completions (+stream)"]["data"]["text"]
    assert rows[LMCACHE]["status"] == rows[BENCH]["status"] == "skip"
    assert "runs on the CPU" in rows[LMCACHE]["detail"] and "CPU" in rows[BENCH]["detail"]
    assert report["counts"]["fail"] == 0


def measure(base_url: str, plan: EvictionPlan) -> OffloadSamples:
    measured = asyncio.run(measure_offload(base_url, "smollm2", plan, None, Budget(300)))
    assert not measured.errors, measured.errors
    (counters,) = measured.resend_cache
    assert counters is not None and counters[0] >= plan.prompt_tokens
    return measured


@pytest.mark.e2e
def test_the_fill_evicts_the_prefix_and_without_lmcache_it_is_not_faster(smollm2: str) -> None:
    """The plan's fill pushes the prefix out of the engine's KV cache (its counters show no
    hit on re-send), so without LMCache the re-sent prompt costs what a cold one does, far
    more than a cache hit: the check fails, as it must."""
    measured = measure(smollm2, CPU_PLAN)
    assert len(measured.cold) == 1 + CPU_PLAN.fill_prompts and len(measured.warm) == 1
    check = judge_offload(measured, CPU_PLAN, min_gain=0.5)
    assert check.data["resend_gpu_hit_fraction"] == [0.0]
    assert check.status == "fail" and "not 50% faster" in check.detail, check
    assert check.data["warm_ttft_p50"] > 3 * check.data["gpu_hit_ttft_p50"]


@pytest.mark.e2e
def test_a_prefix_left_in_the_kv_cache_is_found_and_fails_the_check(smollm2: str) -> None:
    """Without the fill the re-sent prefix is found in the engine's KV cache: not a test of
    LMCache, so the check fails however fast it was."""
    measured = measure(smollm2, dataclasses.replace(CPU_PLAN, fill_prompts=0))
    check = judge_offload(measured, CPU_PLAN, min_gain=0.1)
    assert check.status == "fail" and check.detail.startswith("not evicted"), check
    assert check.data["resend_gpu_hit_fraction"][0] > 0.5
