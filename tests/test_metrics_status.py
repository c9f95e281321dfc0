"""`vrstack status`: the table from GET /status."""

from __future__ import annotations

from rich.console import Console
from typer.testing import CliRunner

from app.cli import cli
from app.cli import status as status_module

STATUS = {
    "models": [
        {
            "name": "smollm2",
            "aliases": ["default"],
            "ready": True,
            "running_replicas": 1,
            "replicas": {
                "abc123": {
                    "in_flight": 3,
                    "running": 2,
                    "queued": 1,
                    "kv_usage": 0.125,
                    "prefix_cache_hit_rate": 0.5,
                }
            },
        },
        {"name": "embed", "aliases": [], "ready": False, "running_replicas": 0, "replicas": {}},
    ],
    "ingress_in_flight": {"chat": 2, "completions": 1},
}


def _text(renderable) -> str:
    console = Console(width=160, record=True)
    console.print(renderable)
    return console.export_text()


def test_table_has_a_row_per_replica_and_per_model_without_replicas():
    text = _text(status_module.render(STATUS, "http://x:8000"))
    assert "smollm2 (default)" in text and "abc123" in text
    assert "12.5%" in text and "50.0%" in text
    row = next(line for line in text.splitlines() if "abc123" in line)
    assert [cell.strip() for cell in row.split("│")][4:7] == ["3", "2", "1"]
    assert "embed" in text and "0 running" in text
    assert "3 request(s) in flight" in text


def test_status_command_reads_the_url(monkeypatch):
    seen = {}

    def fake_fetch(url, *, api_key=None, timeout_s=5.0):
        seen.update(url=url, api_key=api_key)
        return STATUS

    monkeypatch.setattr(status_module, "fetch", fake_fetch)
    result = CliRunner().invoke(cli, ["status", "--url", "http://stack:9000", "--api-key", "k"])
    assert result.exit_code == 0, result.output
    assert seen == {"url": "http://stack:9000", "api_key": "k"}
    assert "abc123" in result.output


def test_status_command_fails_cleanly_without_a_stack():
    result = CliRunner().invoke(cli, ["status", "--url", "http://127.0.0.1:1"])
    assert result.exit_code == 1
