"""`mixbits report PATH`: Markdown and PNGs for a train run, a search run, or a benchmark result JSON.

    mixbits report runs/hawq                      # -> runs/hawq/report/report.md (+ policy and front PNGs)
    mixbits report benchmarks/results/front-resnet20-medium.json --out reports/

A run report holds the training curve, the policy as a per-layer bar chart of weight/activation bits,
the cost breakdown and the accuracy; a search report adds each budget's result and the evaluated front.
A run's report directory is refreshed by a later report of the same run; a benchmark report
(<name>.md, <name>.png) is never replaced without --force.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import MixbitsError
from ..report import benchmark_outputs, report_benchmark, report_run
from ..rundir import add_force_argument, check_output_file, claim_output_dir


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="run directory, or a benchmark result JSON")
    p.add_argument("--out", help="output directory (default: PATH/report for runs, beside the JSON for results)")
    add_force_argument(p)


def run(args) -> int:
    path = Path(args.path)
    if path.is_file() and path.suffix == ".json":
        out = Path(args.out) if args.out else path.parent
        for file in benchmark_outputs(path, out):
            check_output_file(file, force=args.force)
        written = report_benchmark(path, out)
    elif path.is_dir():
        job = f"report of {path.resolve()}"
        with claim_output_dir(Path(args.out) if args.out else path / "report", job, force=args.force) as out:
            written = report_run(path, out)
    else:
        raise MixbitsError(f"{args.path!r} is neither a run directory nor a benchmark result JSON")
    print(f"wrote {written}")
    return 0
