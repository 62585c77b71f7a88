"""`mixbits report PATH`: Markdown and PNGs for a train run, a search run, or a benchmark result JSON.

    mixbits report runs/hawq                      # -> runs/hawq/report/report.md (+ policy and front PNGs)
    mixbits report benchmarks/results/pareto-quick.json --out reports/

A run report holds the training curve, the policy as a per-layer bar chart of weight/activation bits,
the cost breakdown and the accuracy; a search report adds each budget's result and the evaluated front.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import MixbitsError
from ..report import report_benchmark, report_run


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="run directory, or a benchmark result JSON")
    p.add_argument("--out", help="output directory (default: PATH/report for runs, beside the JSON for results)")


def run(args) -> int:
    path = Path(args.path)
    if path.is_file() and path.suffix == ".json":
        written = report_benchmark(path, Path(args.out) if args.out else path.parent)
    elif path.is_dir():
        written = report_run(path, Path(args.out) if args.out else path / "report")
    else:
        raise MixbitsError(f"{args.path!r} is neither a run directory nor a benchmark result JSON")
    print(f"wrote {written}")
    return 0
