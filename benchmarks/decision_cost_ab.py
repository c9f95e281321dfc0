"""Decision cost before/after in one run: `python -m benchmarks.decision_cost_ab --rev HEAD`.

Extracts `app/` (and `benchmarks/`, if the revision has it) at a git revision (`git archive`)
into a temporary folder, then runs the decision-cost micro-benchmark with ARGS alternately from
that copy ("before") and from this working tree ("after"), `--rounds` times each, so both see the
same machine load; prints each run and the median and best p50/p99 of each side as JSON lines.
Each side runs the benchmark its own tree has: `benchmarks.decision_cost`, or at older
revisions `app.lab.decision_cost`.
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

ROOT = Path(__file__).resolve().parents[1]
MODULES = ("benchmarks.decision_cost", "app.lab.decision_cost")  # newest first


def benchmark_module(tree: Path) -> str:
    """The decision-cost module a source tree has (the newest of `MODULES`)."""
    for module in MODULES:
        if (tree / (module.replace(".", "/") + ".py")).is_file():
            return module
    raise FileNotFoundError(f"no decision-cost benchmark in {tree} (looked for {MODULES})")


def extract(rev: str, dest: Path) -> None:
    """`app/` and, if present, `benchmarks/` at a git revision, into `dest`."""
    listed = subprocess.run(
        ["git", "ls-tree", "--name-only", rev], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    folders = [name for name in ("app", "benchmarks") if name in listed]
    archive = subprocess.run(
        ["git", "archive", rev, *folders], cwd=ROOT, capture_output=True, check=True
    ).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(dest, filter="data")


def run(cwd: Path, args: list[str]) -> dict:
    """One run of the tree's benchmark, its JSON line as a dict."""
    out = subprocess.run(
        [sys.executable, "-m", benchmark_module(cwd), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout)


def summary(side: str, rev: str, args: list[str], results: list[dict]) -> dict:
    """The medians and best of one side's runs."""
    p50 = [r["p50_us"] for r in results]
    return {
        "side": side,
        "rev": rev,
        "args": " ".join(args),
        "p50_us_median": statistics.median(p50),
        "p50_us_best": min(p50),
        "p99_us_median": statistics.median(r["p99_us"] for r in results),
        "cpu_p50_us_median": statistics.median(r.get("cpu_p50_us", float("nan")) for r in results),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rev", default="HEAD", help="The 'before' git revision.")
    p.add_argument("--rounds", type=int, default=5)
    a, rest = p.parse_known_args()
    runs: dict[str, list[dict]] = {"before": [], "after": []}
    with tempfile.TemporaryDirectory() as tmp:
        extract(a.rev, Path(tmp))
        for _ in range(a.rounds):
            for side, cwd in (("before", Path(tmp)), ("after", ROOT)):
                result = run(cwd, rest)
                runs[side].append(result)
                print(json.dumps({"side": side, **result}), flush=True)
    print(json.dumps(summary("before", a.rev, rest, runs["before"])))
    print(json.dumps(summary("after", "working tree", rest, runs["after"])))


if __name__ == "__main__":
    main()
