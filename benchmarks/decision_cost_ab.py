"""Decision cost before/after in one run: `python -m benchmarks.decision_cost_ab --rev HEAD`.

Extracts `app/` at a git revision (`git archive`) into a temporary folder, then runs
`python -m benchmarks.decision_cost ARGS` alternately from that copy ("before") and from this
working tree ("after"), `--rounds` times each, so both see the same machine load; prints each
run and the median and best p50/p99 of each side as JSON lines.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tarfile
import tempfile
from io import BytesIO
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run(cwd: Path, args: list[str]) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.decision_cost", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rev", default="HEAD", help="The 'before' git revision.")
    p.add_argument("--rounds", type=int, default=5)
    a, rest = p.parse_known_args()
    archive = subprocess.run(
        ["git", "archive", a.rev, "app"], cwd=ROOT, capture_output=True, check=True
    ).stdout
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(fileobj=BytesIO(archive)) as tar:
            tar.extractall(tmp, filter="data")
        runs: dict[str, list[dict]] = {"before": [], "after": []}
        for _ in range(a.rounds):
            for side, cwd in (("before", Path(tmp)), ("after", ROOT)):
                result = run(cwd, rest)
                runs[side].append(result)
                print(json.dumps({"side": side, **result}), flush=True)
    for side, results in runs.items():
        p50 = [r["p50_us"] for r in results]
        p99 = [r["p99_us"] for r in results]
        cpu = [r.get("cpu_p50_us", float("nan")) for r in results]
        summary = {
            "side": side,
            "rev": a.rev if side == "before" else "working tree",
            "args": " ".join(rest),
            "p50_us_median": statistics.median(p50),
            "p50_us_best": min(p50),
            "p99_us_median": statistics.median(p99),
            "cpu_p50_us_median": statistics.median(cpu),
        }
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
