"""The statistics of the front benchmark: the uniform front, each point's paired gain over it, and 95 % intervals.

The uniform front at a cost is the uniform references' top-1 (W2A2, W3A3, W4A4 by default), linearly
interpolated in log(BitOPs) between the two neighbouring references; a point cheaper than the cheapest
reference compares to it, a point dearer than the dearest to that one. A point's gain is paired: its
top-1 minus the front of the references trained with the same seed (the same data order), so the
seed-to-seed spread that both share cancels. Intervals are Student-t over the seeds. A run whose training
diverged has top-1 None: it is counted (``diverged``) and left out of every mean, the front included.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Iterable, Mapping


def front_at(references: Mapping[float, float], bitops: float) -> float:
    """Top-1 of the uniform front at ``bitops``, from ``{reference bitops: top-1}``."""
    points = sorted(references.items())
    if not points:
        raise ValueError("the uniform front needs at least one reference")
    if bitops <= points[0][0]:
        return points[0][1]
    for (x0, y0), (x1, y1) in zip(points, points[1:], strict=False):
        if bitops <= x1:
            t = (math.log(bitops) - math.log(x0)) / (math.log(x1) - math.log(x0))
            return y0 + t * (y1 - y0)
    return points[-1][1]


def ci95(values: list[float]) -> float:
    """Half-width of the 95 % Student-t interval of the mean (nan for fewer than two values)."""
    if len(values) < 2:
        return math.nan
    from scipy.stats import t

    return float(t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values)))


def add_gains(rows: list[dict], reference_method: str = "uniform-ref") -> list[dict]:
    """Set ``gain_vs_uniform_front`` on every non-reference row (paired by model and seed), and
    ``gain_vs_mean_front`` (against the references' mean over seeds)."""
    by_seed: dict[tuple, dict[float, float]] = defaultdict(dict)
    by_cost: dict[tuple, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r["method"] == reference_method and r["test_top1"] is not None:
            by_seed[r["model"], r["seed"]][r["bitops"]] = r["test_top1"]
            by_cost[r["model"],][r["bitops"]].append(r["test_top1"])
    for r in rows:
        if r["method"] == reference_method:
            r["gain_vs_uniform_front"] = r["gain_vs_mean_front"] = 0.0
            continue
        if r["test_top1"] is None:
            r["gain_vs_uniform_front"] = r["gain_vs_mean_front"] = None
            continue
        refs = by_seed.get((r["model"], r["seed"]))
        r["gain_vs_uniform_front"] = r["test_top1"] - front_at(refs, r["bitops"]) if refs else None
        mean_refs = {b: statistics.fmean(v) for b, v in by_cost[r["model"],].items()}
        r["gain_vs_mean_front"] = r["test_top1"] - front_at(mean_refs, r["bitops"]) if mean_refs else None
    return rows


def summarise(rows: Iterable[dict]) -> list[dict]:
    """One row per (model, method, budget): means over the finished seeds, the gain's mean and 95 % interval, n
    (finished runs) and diverged (runs whose training diverged); the means are None when none finished."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[r["model"], r["method"], r["budget"]].append(r)
    out = []
    for (model, method, budget), group in groups.items():
        finished = [r for r in group if r["test_top1"] is not None]
        gains = [r["gain_vs_uniform_front"] for r in finished if r.get("gain_vs_uniform_front") is not None]
        top1 = [r["test_top1"] for r in finished]
        costs = [r["bitops"] for r in group if r["bitops"] is not None]
        out.append({"model": model, "method": method, "budget": budget, "n": len(finished),
                    "diverged": len(group) - len(finished), "bitops": statistics.fmean(costs) if costs else None,
                    "test_top1": statistics.fmean(top1) if top1 else None, "top1_ci95": ci95(top1),
                    "mean_gain": statistics.fmean(gains) if gains else None, "ci95": ci95(gains),
                    "search_seconds": statistics.fmean(r.get("search_seconds") or 0.0 for r in group),
                    "finetune_seconds": statistics.fmean(r.get("finetune_seconds") or 0.0 for r in group)})
    return sorted(out, key=lambda s: (s["model"], s["bitops"] or 0.0, s["method"]))
