"""Statistics of `vrstack bench` on known inputs."""

from __future__ import annotations

import pytest

from app.bench.summary import (
    RequestRecord,
    distribution,
    errors_by_status,
    markdown,
    percentile,
    summarize,
)


def test_percentile_linear_interpolation() -> None:
    xs = [4.0, 1.0, 3.0, 2.0]  # sorted: 1 2 3 4
    assert percentile(xs, 0) == 1.0
    assert percentile(xs, 100) == 4.0
    assert percentile(xs, 50) == pytest.approx(2.5)
    assert percentile(xs, 99) == pytest.approx(3.97)
    assert percentile(list(range(101)), 90) == pytest.approx(90.0)
    assert percentile([7.0], 99) == 7.0
    assert percentile([], 50) is None
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_distribution() -> None:
    d = distribution([1.0, 2.0, 3.0])
    assert d == {
        "count": 3,
        "mean": 2.0,
        "p50": 2.0,
        "p90": pytest.approx(2.8),
        "p99": (pytest.approx(2.98)),
        "max": 3.0,
    }
    assert distribution([])["p50"] is None


def test_summarize_known_records() -> None:
    records = [
        RequestRecord(0.0, e2e=1.0, ttft=0.1, itl=[0.2, 0.4], output_tokens=10),
        RequestRecord(0.5, e2e=3.0, ttft=0.3, itl=[0.6], output_tokens=30),
        RequestRecord(0.7, status="429", e2e=0.01),
        RequestRecord(0.8, status="500", e2e=0.01),
        RequestRecord(0.9, status="429", e2e=0.01),
    ]
    s = summarize(records, duration_s=4.0)
    assert s["requests"] == 5 and s["succeeded"] == 2 and s["failed"] == 3
    assert s["errors_by_status"] == {"429": 2, "500": 1}
    assert s["requests_per_s"] == pytest.approx(0.5)
    assert s["output_tokens"] == 40
    assert s["output_tokens_per_s"] == pytest.approx(10.0)
    assert s["ttft_s"]["p50"] == pytest.approx(0.2)
    assert s["ttft_s"]["p99"] == pytest.approx(0.298)
    assert s["itl_s"]["count"] == 3
    assert s["itl_s"]["p50"] == pytest.approx(0.4)
    assert s["e2e_s"]["p50"] == pytest.approx(2.0)
    assert s["e2e_s"]["p99"] == pytest.approx(2.98)
    assert errors_by_status(records[:2]) == {}
    md = markdown(s)
    assert "| TTFT | 2 |" in md and "| 429 | 2 |" in md and "| 500 | 1 |" in md


def test_summarize_empty_and_zero_duration() -> None:
    s = summarize([], duration_s=0.0)
    assert s["requests"] == 0 and s["requests_per_s"] is None
    assert "| TTFT | 0 | - |" in markdown(s)


def test_record_json_rounds() -> None:
    out = RequestRecord(0.1234567891, e2e=1.0, ttft=0.5, itl=[0.12345678901]).to_json()
    assert out["start"] == 0.123457 and out["itl"] == [0.123457] and out["status"] == "ok"
