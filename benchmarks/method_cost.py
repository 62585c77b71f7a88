"""What each method's front cost, beside what it gained: search and fine-tune compute in seconds, forward
samples and multiples of one uniform QAT run.

    python benchmarks/method_cost.py --model resnet20 --preset medium

Reads the finished rows of ``benchmarks/front.py`` (no training). The unit is ``compare_runs.qat_run``: one
uniform QAT run of the search's epochs (the uniform references' mean fine-tune, scaled from the fine-tune
epochs to the search epochs), in seconds and in forward samples. Per method (row label): one search per
seed covers every budget, so its compute is taken once per seed (mean over seeds); its fine-tunes are one
per budget (summed per seed). The gain is each row's top-1 over the uniform front at its BitOPs
(``front_stats.add_gains``, paired by seed), pooled over the budgets between the uniform levels: mean per
seed, then mean over seeds with its 95 % interval. Seconds come from whichever machines made the rows (each
row keeps its threads); a multiple is a ratio of those. Writes
benchmarks/results/method-cost-<model>-<preset>.json and .md (``--state-dir`` another directory:
...-<its name>).
"""

from __future__ import annotations

import statistics
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import markdown_table, write_report  # noqa: E402
from compare_runs import _mean as mean_or_none  # noqa: E402
from compare_runs import _ratio as ratio  # noqa: E402
from compare_runs import qat_run, read_rows  # noqa: E402
from front import BETWEEN as BETWEEN_LEVELS  # noqa: E402
from front import REFERENCE  # noqa: E402
from front_stats import ci95  # noqa: E402
from policy_layers import front_arguments, front_rows_file, report_name  # noqa: E402

BETWEEN = {f"bitops<={b}" for b in BETWEEN_LEVELS}  # the budgets between the uniform levels (not at them)


def method_costs(rows: list[dict]) -> list[dict]:
    """One line per method label: compute per seed and per policy, as multiples of the QAT unit, and its gain."""
    """``rows`` with their gains (``compare_runs.read_rows``)."""
    unit = qat_run(rows)
    by_method: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        if r["method"] != REFERENCE:
            by_method[r["method"]].append(r)
    out = []
    for method, group in sorted(by_method.items()):
        per_seed: dict[int, list[dict]] = defaultdict(list)
        for r in group:
            per_seed[r["seed"]].append(r)
        search_s = [seed_rows[0].get("search_seconds") or 0.0 for seed_rows in per_seed.values()]
        search_p = [seed_rows[0].get("search_passes") or 0 for seed_rows in per_seed.values()]
        finetune_s = [sum(r.get("finetune_seconds") or 0.0 for r in seed_rows) for seed_rows in per_seed.values()]
        gains = []
        for seed_rows in per_seed.values():
            between = [r["gain_vs_uniform_front"] for r in seed_rows
                       if r["budget"] in BETWEEN and r.get("gain_vs_uniform_front") is not None]
            if between:
                gains.append(statistics.fmean(between))
        out.append({"method": method, "seeds": len(per_seed), "search_seconds": mean_or_none(search_s),
                    "search_passes": mean_or_none(search_p),
                    "search_x_qat": ratio(mean_or_none(search_s), unit.get("seconds")),
                    "search_passes_x_qat": ratio(mean_or_none(search_p), unit.get("passes")),
                    "finetune_seconds_per_seed": mean_or_none(finetune_s),
                    "total_x_qat": ratio(mean_or_none([a + b for a, b in zip(search_s, finetune_s, strict=True)]),
                                         unit.get("seconds")),
                    "pooled_gain": mean_or_none(gains), "gain_ci95": ci95(gains)})
    return out


def main(argv=None) -> None:
    args = front_arguments(__doc__, "resnet20", argv)
    rows_file = front_rows_file(args)
    rows = read_rows(rows_file)
    unit = qat_run(rows)
    table = method_costs(rows)
    columns = ["method", "seeds", "search_seconds", "search_passes", "search_x_qat", "search_passes_x_qat",
               "finetune_seconds_per_seed", "total_x_qat", "pooled_gain", "gain_ci95"]
    header = (f"compute per method on the {args.model} {args.preset} front ({rows_file}). One uniform QAT run of the "
              f"search's epochs (compare_runs.qat_run): {unit.get('seconds') or 0:.1f} s, "
              f"{unit.get('passes') or 0:.0f} forward samples. "
              "search_*: one search per seed (every budget), mean over seeds; *_x_qat: multiples of the QAT run; "
              "total_x_qat: search and every budget's fine-tune; pooled_gain: top-1 over the uniform front, mean over "
              "the in-between budgets per seed, then over seeds (gain_ci95: 95 % interval).")
    write_report(report_name("method-cost", args), header, markdown_table(table, columns),
                 {"args": vars(args), "qat_unit": unit, "methods": table})


if __name__ == "__main__":
    main()
