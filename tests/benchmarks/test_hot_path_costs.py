"""The hot-path cost command runs and times what it names."""

from __future__ import annotations

import sys

import pytest

from benchmarks import hot_path_costs


def test_the_command_prints_each_cost(monkeypatch, capsys) -> None:
    pytest.importorskip("tokenizers")
    monkeypatch.setattr(sys, "argv", ["hot_path_costs", "--rounds", "20"])
    hot_path_costs.main()
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 and all(line.endswith("µs") for line in lines)


@pytest.mark.parametrize("chat", [False, True])
def test_the_timed_event_is_one_a_migratable_stream_reads(chat: bool) -> None:
    stream, event = hot_path_costs.stream_events(chat)
    out = stream.take(event)
    assert stream.generated[-1] == 28543 and b'"token_ids":null' in out
