"""Two runs of the front benchmark side by side: the same methods, budgets and seeds, two versions of the code.

    python benchmarks/compare_runs.py A/rows.jsonl B/rows.jsonl --methods oneshot oneshot-free --name stride

For a change to one method (e.g. the one-shot walk's ``stride``), run ``front.py --methods <method>`` at the
new commit into another ``--state-dir`` and compare its rows with the committed ones: per method and budget,
the mean test top-1 of each, their difference paired by seed with a 95 % Student-t interval, each one's
gain over its own uniform front, and the search's compute (seconds and forward samples), also as a multiple
of one uniform QAT run of the search's epochs (the run's own uniform references' fine-tunes, scaled from the
preset's fine-tune epochs to its search epochs; a QAT sample is a forward and a backward, a scored one a
forward only, so the seconds are the fairer ratio). A second table pools each method's budgets: per seed
the mean difference over the budgets both runs finished for every compared seed, then the interval over
seeds; the budgets of one seed share a search, so this is the fairer test of a change that acts on all of
them. Writes benchmarks/experiments/results/compare-<name>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import EXPERIMENT_RESULTS, markdown_table, write_report  # noqa: E402
from front_stats import add_gains, ci95  # noqa: E402


def read_rows(path: Path) -> list[dict]:
    return add_gains([json.loads(line) for line in path.read_text().splitlines() if line.strip()])


def qat_run(rows: list[dict]) -> dict:
    """Seconds and forward samples of one uniform QAT run of the preset's search epochs (mean over references)."""
    from front import REFERENCE, preset_for  # the presets' epochs; imported here, front.py loads the library

    refs = [r for r in rows if r["method"] == REFERENCE and r.get("finetune_passes")]
    if not refs:
        return {}
    preset = preset_for(refs[0]["preset"], refs[0]["model"])
    scale = preset["search_epochs"] / preset["finetune_epochs"]
    return {"seconds": scale * statistics.mean(r["finetune_seconds"] for r in refs),
            "passes": scale * statistics.mean(r["finetune_passes"] for r in refs)}


def _ratio(value: float | None, base: float | None) -> float | None:
    return None if value is None or not base else value / base


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.mean(values) if values else None


def compare(a: list[dict], b: list[dict], methods: list[str]) -> list[dict]:
    """One line per (method, budget) both runs have, paired by seed."""
    index_b = {(r["method"], r["budget"], r["seed"]): r for r in b}
    qat_a, qat_b = qat_run(a), qat_run(b)
    out = []
    for method in methods:
        for budget in sorted({r["budget"] for r in a if r["method"] == method}):
            pairs = [(r, index_b[method, budget, r["seed"]]) for r in a
                     if r["method"] == method and r["budget"] == budget and (method, budget, r["seed"]) in index_b]
            pairs = [(x, y) for x, y in pairs if x["test_top1"] is not None and y["test_top1"] is not None]
            if not pairs:
                continue
            diffs = [y["test_top1"] - x["test_top1"] for x, y in pairs]
            out.append({"method": method, "budget": budget, "n": len(pairs),
                        "top1_a": _mean([x["test_top1"] for x, _ in pairs]),
                        "top1_b": _mean([y["test_top1"] for _, y in pairs]),
                        "diff_b_minus_a": statistics.mean(diffs), "ci95": ci95(diffs) if len(diffs) > 1 else None,
                        "gain_a": _mean([x.get("gain_vs_uniform_front") for x, _ in pairs]),
                        "gain_b": _mean([y.get("gain_vs_uniform_front") for _, y in pairs]),
                        "search_seconds_a": _mean([x.get("search_seconds") for x, _ in pairs]),
                        "search_seconds_b": _mean([y.get("search_seconds") for _, y in pairs]),
                        "search_passes_a": _mean([x.get("search_passes") for x, _ in pairs]),
                        "search_passes_b": _mean([y.get("search_passes") for _, y in pairs])})
            line = out[-1]
            for side, qat in (("a", qat_a), ("b", qat_b)):
                line[f"search_vs_qat_seconds_{side}"] = _ratio(line[f"search_seconds_{side}"], qat.get("seconds"))
                line[f"search_vs_qat_passes_{side}"] = _ratio(line[f"search_passes_{side}"], qat.get("passes"))
    return out


def pooled(a: list[dict], b: list[dict], methods: list[str]) -> list[dict]:
    """One line per method: its budgets averaged within each seed, the difference's interval taken over seeds."""
    def finished(rows):
        return {(r["method"], r["budget"], r["seed"]): r["test_top1"] for r in rows if r["test_top1"] is not None}

    top1_a, top1_b = finished(a), finished(b)
    out = []
    for method in methods:
        keys = [k for k in top1_a if k[0] == method and k in top1_b]
        seeds = sorted({k[2] for k in keys})
        # only budgets every seed finished in both runs, so each seed's mean is over the same budgets
        budgets = sorted(set.intersection(*({k[1] for k in keys if k[2] == s} for s in seeds))) if seeds else []
        if not budgets:
            continue
        per_seed = [statistics.mean(top1_b[method, x, s] - top1_a[method, x, s] for x in budgets) for s in seeds]
        out.append({"method": method, "budgets": len(budgets), "n": len(seeds),
                    "top1_a": statistics.mean(top1_a[method, x, s] for x in budgets for s in seeds),
                    "top1_b": statistics.mean(top1_b[method, x, s] for x in budgets for s in seeds),
                    "diff_b_minus_a": statistics.mean(per_seed), "ci95": ci95(per_seed) if len(seeds) > 1 else None,
                    "per_seed_diff": [round(d, 2) for d in per_seed]})
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a", type=Path, help="rows.jsonl of the first run (the baseline)")
    p.add_argument("b", type=Path, help="rows.jsonl of the second run")
    p.add_argument("--methods", nargs="+", required=True)
    p.add_argument("--name", required=True, help="results are written as compare-<name>.json|md")
    args = p.parse_args(argv)
    a, b = read_rows(args.a), read_rows(args.b)
    lines = compare(a, b, args.methods)
    codes = {"a": sorted({r.get("code") for r in a}), "b": sorted({r.get("code") for r in b})}
    columns = ["method", "budget", "n", "top1_a", "top1_b", "diff_b_minus_a", "ci95", "gain_a", "gain_b",
               "search_seconds_a", "search_seconds_b", "search_passes_a", "search_passes_b",
               "search_vs_qat_seconds_a", "search_vs_qat_seconds_b", "search_vs_qat_passes_a", "search_vs_qat_passes_b"]
    pooled_lines = pooled(a, b, args.methods)
    pooled_table = markdown_table(pooled_lines, ["method", "budgets", "n", "top1_a", "top1_b", "diff_b_minus_a",
                                                 "ci95", "per_seed_diff"])
    table = (f"{markdown_table(lines, columns)}\n\nPooled over budgets (per seed the mean difference over them, "
             f"interval over seeds):\n\n{pooled_table}")
    header = (f"a: {args.a} (code {', '.join(map(str, codes['a']))}); b: {args.b} (code "
              f"{', '.join(map(str, codes['b']))}). diff: b minus a, paired by seed, 95 % Student-t interval; "
              "gain: over each run's own uniform front; search_vs_qat: the search's compute over one uniform QAT "
              "run of the search's epochs (the run's own references, fine-tune epochs scaled to search epochs).")
    write_report(f"compare-{args.name}", header, table,
                 {"args": {k: str(v) for k, v in vars(args).items()}, "codes": codes, "rows": lines,
                  "pooled": pooled_lines}, directory=EXPERIMENT_RESULTS)


if __name__ == "__main__":
    main()
