"""The statistics of the front benchmark: each point's paired gains, and 95 % intervals.

Three gains per point, each paired by seed (the same data order, so the seed-to-seed spread cancels):
- over the uniform front (``gain_vs_uniform_front``), a low bar: accuracy is concave in log BitOPs, so any
  in-between policy tends to sit above the chord;
- over the best reference at no more BitOPs (``gain_vs_best_reference``): the cheap policy a user would try first
  (uniform, a wXaY mix, or the deployment rule), the one with the highest top-1 among those costing no more;
- over random search and HAWQ at the same budget (``gain_vs_random``, ``gain_vs_hawq``).
``pooled`` averages a method's gain over several budgets per seed and gives the interval over seeds.

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


REFERENCE_METHODS = ("uniform-ref", "mix-ref", "rule-ref")
PAIRED_BASELINES = ("random", "hawq")
GAINS = ("gain_vs_uniform_front", "gain_vs_best_reference", *(f"gain_vs_{b}" for b in PAIRED_BASELINES))


def add_reference_gains(rows: list[dict], references: Iterable[str] = REFERENCE_METHODS) -> list[dict]:
    """Set ``gain_vs_best_reference`` (and ``best_reference``, the reference's method and budget) on every row that
    is not a reference: its top-1 minus the best top-1 among the same seed's references costing no more BitOPs.
    None when no reference is that cheap or the row has no top-1."""
    references = set(references)
    by_seed: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        if r["method"] in references and r["test_top1"] is not None:
            by_seed[r["model"], r["seed"]].append(r)
    for r in rows:
        if r["method"] in references:
            continue
        r["gain_vs_best_reference"] = r["best_reference"] = None
        if r["test_top1"] is None or r["bitops"] is None:
            continue
        cheaper = [ref for ref in by_seed[r["model"], r["seed"]] if ref["bitops"] <= r["bitops"] * (1 + 1e-9)]
        if cheaper:
            best = max(cheaper, key=lambda ref: ref["test_top1"])
            r["gain_vs_best_reference"] = r["test_top1"] - best["test_top1"]
            r["best_reference"] = f"{best['method']} {best['budget']}"
    return rows


def add_paired_gains(rows: list[dict], baselines: Iterable[str] = PAIRED_BASELINES) -> list[dict]:
    """Set ``gain_vs_<baseline>`` on every other row: its top-1 minus the baseline's at the same budget and seed
    (None where either has none)."""
    baselines = tuple(baselines)
    top1 = {(r["model"], r["method"], r["budget"], r["seed"]): r["test_top1"] for r in rows}
    for r in rows:
        for baseline in baselines:
            if r["method"] == baseline:
                continue
            theirs = top1.get((r["model"], baseline, r["budget"], r["seed"]))
            r[f"gain_vs_{baseline}"] = (None if theirs is None or r["test_top1"] is None
                                        else r["test_top1"] - theirs)
    return rows


def pooled(rows: Iterable[dict], budgets: Iterable[str], gains: Iterable[str] = GAINS) -> list[dict]:
    """Per (model, method) and gain: per seed the mean gain over ``budgets`` (those the seed has), then the mean
    and 95 % interval over seeds, and n (seeds)."""
    budgets = set(budgets)
    per_seed: dict[tuple, list[float]] = defaultdict(list)
    for r in rows:
        if r["budget"] not in budgets:
            continue
        for gain in gains:
            if r.get(gain) is not None:
                per_seed[r["model"], r["method"], gain, r["seed"]].append(r[gain])
    out: dict[tuple, dict] = {}
    for (model, method, gain, _seed), values in sorted(per_seed.items()):
        line = out.setdefault((model, method), {"model": model, "method": method})
        line.setdefault(f"_{gain}", []).append(statistics.fmean(values))
    for line in out.values():
        for gain in gains:
            seeds = line.pop(f"_{gain}", [])
            line[gain] = statistics.fmean(seeds) if seeds else None
            line[f"{gain}_ci95"] = ci95(seeds)
            line[f"{gain}_n"] = len(seeds)
    return list(out.values())


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
        others = {}
        for gain in GAINS[1:]:
            values = [r[gain] for r in finished if r.get(gain) is not None]
            others[gain] = statistics.fmean(values) if values else None
            others[f"{gain}_ci95"] = ci95(values)
        top1 = [r["test_top1"] for r in finished]
        costs = [r["bitops"] for r in group if r["bitops"] is not None]
        out.append({"model": model, "method": method, "budget": budget, "n": len(finished),
                    "diverged": len(group) - len(finished), "bitops": statistics.fmean(costs) if costs else None,
                    "test_top1": statistics.fmean(top1) if top1 else None, "top1_ci95": ci95(top1),
                    "mean_gain": statistics.fmean(gains) if gains else None, "ci95": ci95(gains), **others,
                    "search_seconds": statistics.fmean(r.get("search_seconds") or 0.0 for r in group),
                    "finetune_seconds": statistics.fmean(r.get("finetune_seconds") or 0.0 for r in group)})
    return sorted(out, key=lambda s: (s["model"], s["bitops"] or 0.0, s["method"]))
