"""The real-engine comparison (`benchmarks.engines`): engine arguments and the ratio tables."""

from __future__ import annotations

import pytest

from app.bench.summary import RequestRecord, summarize
from app.engines.embedded import model_dir
from benchmarks.engines import (
    DEFAULT_CONFIG,
    Target,
    markdown,
    model_spec,
    parser,
    per_round_ratios,
    ratios,
    row,
    target_env,
    vllm_argv,
    within,
)
from tests.conftest import ROOT


def _row(ttft: float, tokens_per_s: float) -> dict:
    return {
        "requests": 4, "succeeded": 4, "errors": {}, "ttft_p50": ttft, "ttft_p99": ttft * 2,
        "itl_p50": 0.05, "itl_p99": 0.1, "e2e_p50": 1.0, "e2e_p99": 2.0,
        "tokens_per_s": tokens_per_s, "requests_per_s": tokens_per_s / 32,
    }  # fmt: skip


def test_bare_vllm_gets_the_serve_configs_engine_settings() -> None:
    argv = vllm_argv(model_spec(ROOT / DEFAULT_CONFIG), 4321)
    assert argv[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    flags = " ".join(argv[3:])
    assert f"--model {model_dir('smollm2')} --served-model-name smollm2" in flags
    assert "--host 127.0.0.1 --port 4321" in flags
    assert "--dtype float32" in flags
    assert "--max-model-len 2048" in flags
    assert argv.count("--enforce-eager") == 1 and "True" not in argv


def test_row_keeps_the_compared_figures_of_a_summary() -> None:
    records = [
        RequestRecord(start=0.0, e2e=1.0, ttft=0.2, itl=[0.1] * 4, output_tokens=5),
        RequestRecord(start=0.0, e2e=3.0, ttft=0.4, itl=[0.3] * 4, output_tokens=5),
        RequestRecord(start=0.0, status="503"),
    ]
    r = row(summarize(records, 2.0))
    assert (r["requests"], r["succeeded"], r["errors"]) == (3, 2, {"503": 1})
    assert r["ttft_p50"] == pytest.approx(0.3)
    assert r["tokens_per_s"] == pytest.approx(5.0)
    assert r["requests_per_s"] == pytest.approx(1.0)


def test_ratios_divide_by_bare_vllm_and_judge_the_10_percent_target() -> None:
    rel = ratios({"vllm": _row(0.100, 200.0), "ours": _row(0.125, 190.0)})
    assert rel["vllm"]["ttft_p50"] == pytest.approx(1.0)
    assert rel["ours"]["ttft_p50"] == pytest.approx(1.25)
    assert rel["ours"]["tokens_per_s"] == pytest.approx(0.95)
    assert within(rel["ours"]["ttft_p50"], higher_is_better=False) is False
    assert within(rel["ours"]["tokens_per_s"], higher_is_better=True) is True
    assert within(1.10, higher_is_better=False) is True
    assert within(None, higher_is_better=True) is None
    assert ratios({"vllm": _row(0.1, 0.0), "ours": _row(0.1, 5.0)})["ours"]["tokens_per_s"] is None


def test_per_round_ratios_pair_rounds_and_concurrency() -> None:
    vllm, ours = Target("vllm"), Target("ours")
    vllm.rounds = [{"round": 1, "concurrency": 4, **_row(0.1, 100.0)},
                   {"round": 2, "concurrency": 4, **_row(0.2, 100.0)}]  # fmt: skip
    ours.rounds = [{"round": 2, "concurrency": 4, **_row(0.3, 50.0)}]
    out = per_round_ratios({"vllm": vllm, "ours": ours})
    mine = [r for r in out if r["target"] == "ours"]
    assert len(mine) == 1
    assert mine[0]["ttft_p50"] == pytest.approx(1.5)
    assert mine[0]["tokens_per_s"] == pytest.approx(0.5)


def test_markdown_has_a_row_per_target_with_its_ratios() -> None:
    report = {
        "pooled": {4: {"vllm": _row(0.1, 200.0), "ours": _row(0.12, 180.0)}},
        "requests_per_level": {4: 48},
        "rounds": 2,
        "per_round_ratios": [],
        "start_s": {"vllm": [40.0, 41.0], "ours": [80.0, 82.0]},
    }
    text = markdown(report)
    assert "**4 concurrent streams** (48 requests per target per round, pooled over 2" in text
    assert "| ours | 4 / 4 | 0 | 120.0 | 240.0 |" in text
    assert "| 180.00 | 5.62 | 1.20 | 0.90 |" in text
    assert "ours 80 / 82" in text


def test_the_serial_level_compares_whole_answers() -> None:
    report = {
        "pooled": {
            "serial": {"vllm": _row(0.1, 20.0), "ours": _row(0.1, 20.0) | {"e2e_p50": 1.05}}
        },
        "requests_per_level": {"serial": 30},
        "rounds": 2,
        "per_round_ratios": [],
        "start_s": {},
    }
    text = markdown(report)
    assert "**Serial one-token completions** (30 requests per target per round" in text
    assert "| ours | 4 / 4 | 0 | 1050.0 | 2000.0 | 0.62 | 1.05 |" in text


def test_each_ray_target_runs_in_its_data_plane_and_is_marked() -> None:
    stock, direct, ours = (target_env(t, "r1") for t in ("stock", "stock-direct", "ours"))
    assert stock == {"VRSTACK_RUN": "r1"}
    assert ours["RAY_SERVE_ENABLE_HA_PROXY"] == "1" and ours["VRSTACK_RUN"] == "r1"
    assert "RAY_SERVE_LLM_ENABLE_DIRECT_STREAMING" not in ours
    assert direct["RAY_SERVE_LLM_ENABLE_DIRECT_STREAMING"] == "1"
    assert direct["RAY_SERVE_ENABLE_HA_PROXY"] == "1"


def test_defaults_are_bounded() -> None:
    a = parser().parse_args([])
    assert a.rounds == 2 and a.concurrency == [4, 16] and a.max_tokens == 32
    assert a.serial == 30 and a.targets == ["vllm", "stock", "stock-direct", "ours"]
    assert a.max_duration > 0 and a.start_timeout > 0
