"""The command line the long benchmarks share: `--json`/`--markdown`, and a `main` that runs,
reports and exits (SIGTERM unwinds as Ctrl-C does, through `benchmarks.overhead.serve_cluster`,
which stops what the run started)."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

Report = dict[str, Any]


def report_options(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add `--json` and `--markdown` (where the report goes besides stdout)."""
    p.add_argument("--json", dest="json_out", type=Path, help="Write the report as JSON.")
    p.add_argument("--markdown", type=Path, help="Write the markdown table to this file.")
    return p


def settings(a: argparse.Namespace) -> dict[str, Any]:
    """The run's options, for its report (not where the report goes)."""
    return {k: v for k, v in vars(a).items() if k not in {"json_out", "markdown"}}


def stop(signum: int, frame: Any) -> None:
    """SIGTERM's handler: unwind as Ctrl-C does."""
    raise KeyboardInterrupt


def main(
    module: str,
    parser: argparse.ArgumentParser,
    run: Callable[[argparse.Namespace], Report],
    markdown: Callable[[Report], str],
    *,
    failed: Callable[[Report], bool] = lambda report: False,
) -> None:
    """Run `python -m benchmarks.<module>`: the report (with its command) as JSON and markdown
    where asked, the markdown printed; exit 1 when `failed(report)`."""
    a = parser.parse_args()
    signal.signal(signal.SIGTERM, stop)
    try:
        report = {"command": f"python -m benchmarks.{module} " + " ".join(sys.argv[1:]), **run(a)}
    except KeyboardInterrupt:
        sys.exit("interrupted: the Ray cluster and the processes of the run are stopped")
    text = markdown(report)
    if a.json_out:
        a.json_out.write_text(json.dumps(report, indent=1) + "\n")
    if a.markdown:
        a.markdown.write_text(text)
    print(text)
    if failed(report):
        sys.exit(1)
