"""The one-shot claim at the uniform levels: is a subnet, retraining-free, as good as fine-tuned uniform QAT?

    python benchmarks/experiments/oneshot_levels.py --model resnet20 --preset medium

Seed 002 says the subnets of its trained supernet need no retraining. This runs the one-shot search at
``bitops<=uniform:3`` and ``bitops<=uniform:4`` with the front benchmark's setting (benchmarks/front.py: its
float weights, data, seeds and search epochs) and compares, paired by seed, the found subnet with only its
BatchNorm recalibrated ("oneshot-free"), and the same policy after the front's one fine-tune ("oneshot"),
with the uniform W3A3 and W4A4 references fine-tuned by that recipe. Rows are cached like the front's, in
their own file (front-state/<model>-<preset>/oneshot-levels/); the front's finished uniform references of the
same code are taken from its rows rather than run again. Writes
benchmarks/experiments/results/oneshot-levels-<model>-<preset>.json and .md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/
from common import EXPERIMENT_RESULTS, markdown_table, write_report  # noqa: E402
from front import MODELS, PRESETS, REFERENCE, STATE, Bench, RowCache  # noqa: E402
from front_stats import ci95  # noqa: E402

LEVELS = (3, 4)


def level_summary(bench: Bench, seeds: list[int]) -> list[dict]:
    """Per level and method: mean top-1 and the paired difference to the uniform reference of the same seed."""
    out = []
    for bits in LEVELS:
        reference = {s: bench.cache.get(REFERENCE, f"uniform:{bits}", s)["test_top1"] for s in seeds}
        reference = {s: top1 for s, top1 in reference.items() if top1 is not None}  # a diverged reference pairs nothing
        for method in ("oneshot-free", "oneshot"):
            rows = [bench.cache.get(method, f"bitops<=uniform:{bits}", s) for s in seeds]
            finished = [r for r in rows if r["test_top1"] is not None and r["seed"] in reference]
            diffs = [r["test_top1"] - reference[r["seed"]] for r in finished]
            out.append({"level": f"uniform:{bits}", "method": method, "n": len(finished),
                        "uniform_top1": statistics.mean(reference.values()),
                        "test_top1": statistics.mean(r["test_top1"] for r in finished) if finished else None,
                        "mean_diff": statistics.mean(diffs) if diffs else None,
                        "ci95": ci95(diffs) if len(diffs) > 1 else None,
                        "per_seed_diff": [round(d, 2) for d in diffs],
                        "bitops_vs_uniform": statistics.mean(
                            r["bitops"] / bench.cache.get(REFERENCE, f"uniform:{bits}", r["seed"])["bitops"]
                            for r in finished) if finished else None})
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(MODELS), default="resnet20")
    p.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    p.add_argument("--seeds", type=int, nargs="+", help="override the preset's seeds")
    p.add_argument("--device", default="cpu")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--state-dir", default=str(STATE), help="the front benchmark's state (float weights, rows)")
    args = p.parse_args(argv)
    bench = Bench(argparse.Namespace(**vars(args), keep_stale=False))
    front = bench.cache
    bench.dir = bench.dir.with_name(bench.dir.name + "-oneshot-levels")  # its fine-tunes' checkpoints: not the front's
    bench.cache = RowCache(bench.state / "oneshot-levels", front.version)
    for row in front.rows.values():  # the front's references of this code are these references: not run twice
        if row["method"] == REFERENCE and not bench.cache.get(REFERENCE, row["budget"], row["seed"]):
            bench.cache.put(row)
    bench.preset["budgets"] = tuple(f"uniform:{bits}" for bits in LEVELS)
    seeds = list(bench.preset["seeds"])
    for seed in seeds:
        bench.references(seed)
        bench.method("oneshot", seed)
    summary = level_summary(bench, seeds)
    columns = ["level", "method", "n", "uniform_top1", "test_top1", "mean_diff", "ci95", "per_seed_diff",
               "bitops_vs_uniform"]
    table = markdown_table(summary, columns)
    name = f"oneshot-levels-{args.model}-{args.preset}"
    header = (f"one-shot at the uniform levels, {args.model} preset {args.preset}; float {bench.float_top1:.2f} %; "
              f"seeds {seeds}; code {bench.cache.version}. diff: top-1 minus the fine-tuned uniform reference of "
              "the same seed, 95 % Student-t interval over seeds.")
    write_report(name, header, table, {
        "args": vars(args), "preset": bench.preset, "code": bench.cache.version,
        "rows": sorted(bench.cache.rows.values(), key=lambda r: (r["method"], r["budget"], r["seed"])),
        "summary": summary}, directory=EXPERIMENT_RESULTS)


if __name__ == "__main__":
    main()
