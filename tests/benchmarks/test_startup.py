"""Start-up timing (`benchmarks.startup`): log parsing and the phase breakdown, on known lines."""

from __future__ import annotations

from datetime import datetime

import pytest

from app.launcher import stamp
from benchmarks.startup import (
    LAUNCHER_EVENTS,
    RAY_SERVE_EVENTS,
    SERVE_LOG_EVENTS,
    Event,
    find_events,
    markdown,
    parse_stamped,
    phases,
    ray_serve_lines,
    reported_durations,
)


def _epoch(text: str, fmt: str = "%Y-%m-%d %H:%M:%S.%f") -> float:
    return datetime.strptime(text, fmt).timestamp()


def test_parse_stamped_reads_the_launcher_prefix_and_ray_serve_lines() -> None:
    lines = [
        "2026-11-25T23:59:59.250 (ServeReplica pid=1) INFO Loading weights took 1.46 seconds",
        "INFO 2026-11-26 00:00:01,500 controller 7 -- Controller starting (version='2.60.0').",
        "no stamp at all",
        "",
    ]
    parsed = parse_stamped(lines)
    assert [text for _, text in parsed] == [
        "(ServeReplica pid=1) INFO Loading weights took 1.46 seconds",
        "controller 7 -- Controller starting (version='2.60.0').",
    ]
    assert parsed[0][0] == pytest.approx(_epoch("2026-11-25 23:59:59.250"))
    assert parsed[1][0] - parsed[0][0] == pytest.approx(2.25)  # across midnight


def test_the_launcher_stamp_round_trips() -> None:
    at = _epoch("2026-11-25 22:03:01.125")
    ((parsed_at, text),) = parse_stamped([f"{stamp(at)} hello"])
    assert (parsed_at, text) == (pytest.approx(at), "hello")


def test_find_events_keeps_the_first_match_of_each_pattern() -> None:
    lines = [
        (10.0, "Ray head: ✓ Ray head started"),
        (12.0, "INFO Loading weights took 2.00 seconds"),
        (13.0, "INFO Loading weights took 9.00 seconds"),
    ]
    events = find_events(lines, [("weights", r"Loading weights took"), ("never", r"nope")])
    assert events == [Event("weights", 12.0)]


def test_phases_run_from_event_to_event_in_time_order() -> None:
    events = [Event("b", 130.0), Event("a", 110.0), Event("c", 131.5)]
    assert phases(100.0, events) == [
        {"until": "a", "at_s": 10.0, "duration_s": 10.0},
        {"until": "b", "at_s": 30.0, "duration_s": 20.0},
        {"until": "c", "at_s": 31.5, "duration_s": 1.5},
    ]
    assert sum(p["duration_s"] for p in phases(100.0, events)) == pytest.approx(31.5)


def test_real_log_lines_match_their_events() -> None:
    launcher = [(1.0, "✓ model smollm2: /c/models/smollm2"), (2.0, "✓ Ray head started")]
    serve = [
        (3.0, "(ServeReplica:vrstack:engine:smollm2 pid=9) INFO 11-25 21:05:03 [model.py:684] "
              "Resolved architecture: LlamaForCausalLM"),
        (4.0, "(EngineCore pid=22245) INFO 11-25 21:05:44 [core.py:368] init engine (profile, "
              "create kv cache, warmup model) took 3.98 s"),
    ]  # fmt: skip
    ray = [
        (5.0, "vrstack_engine:smollm2 b7rtb8ti -- Running tasks to download model files on "
              "worker nodes"),
        (6.0, "controller 32188 -- Replica(id='b7rtb8ti', deployment='engine:smollm2', "
              "app='vrstack') started successfully on node 'efb3'"),
        (7.0, "controller 32188 -- Replica(id='bw3k', deployment='ingress', app='vrstack') "
              "started successfully on node 'efb3'"),
    ]  # fmt: skip
    found = {
        e.name: e.at
        for e in find_events(launcher, LAUNCHER_EVENTS)
        + find_events(serve, SERVE_LOG_EVENTS)
        + find_events(ray, RAY_SERVE_EVENTS)
    }
    assert found == {
        "model converted (launcher)": 1.0,
        "Ray head started (launcher)": 2.0,
        "serve run connected, first output": 3.0,
        "engine replica: vLLM config resolved": 3.0,
        "KV cache allocated, model warmed up": 4.0,
        "engine replica: Ray LLM download task starts": 5.0,
        "controller: engine replica RUNNING": 6.0,
    }
    assert reported_durations(serve) == {"profile + KV cache + warm-up (vLLM)": 3.98}


def test_ray_serve_lines_reads_only_lines_since_the_start(tmp_path) -> None:
    (tmp_path / "controller_1.log").write_text(
        "INFO 2026-11-25 22:00:00,000 controller 1 -- old run\n"
        "INFO 2026-11-25 22:10:00,000 controller 1 -- Controller starting\n"
    )
    lines = ray_serve_lines(_epoch("2026-11-25 22:05:00.000"), tmp_path)
    assert [text for _, text in lines] == ["controller 1 -- Controller starting"]
    assert ray_serve_lines(0.0, tmp_path / "missing") == []


def test_markdown_names_the_total_and_each_phase() -> None:
    result = {
        "run": "cold",
        "first_answer_s": 98.25,
        "phases": phases(0.0, [Event("Ray head started (launcher)", 8.0)]),
        "vllm_reported_s": {"weight load (vLLM)": 1.5},
    }
    text = markdown([result, {**result, "run": "warm", "first_answer_s": None}])
    assert "**cold**: first answer after **98.2 s**" in text
    assert "| Ray head started (launcher) | 8.0 | 8.0 |" in text
    assert "| (inside) weight load (vLLM) | | 1.5 |" in text
    assert "**warm**: first answer after (none: timed out)" in text
