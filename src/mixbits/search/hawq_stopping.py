"""When are HAWQ's Hessian traces steady enough? The standard error of what the integer program compares.

The program compares Ω(l, w, a) = ½ · (tr(H_W)·u_W(w) + tr(H_A)·u_A(a)) across layers, u being the layer's
squared quantization error per element at that bit-width, and its choice does not change when every Ω is scaled
alike. A trace's own relative error measures neither: a trace near zero has an unbounded relative error however
many batches it gets, though where its term is small beside the layer's other term, or the layer's Ω small beside
the others', its noise cannot move the choice; and a batch with a few hard samples raises every layer's
curvature together, which widens every trace's spread but moves no comparison. So each layer's error here is,
at the candidate pair where it is worst, the standard error of its share of the summed Ω (per batch, both terms
together) over the larger of that share and the average share 1/L: an error of a fifth of an average layer's
share cannot lift a negligible layer past an average one.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

Units = dict[str, dict[str, dict[int, float]]]  # layer -> {"weight": {bits: u}, "act": {bits: u}}


def sensitivity(trace_w: float, trace_a: float, unit: dict[str, dict[int, float]], w: int, a: int) -> float:
    """Ω of one layer at (w, a); a negative trace (probe noise) counts as 0, so more bits never score worse."""
    return 0.5 * (max(0.0, trace_w) * unit["weight"][w] + max(0.0, trace_a) * unit["act"][a])


def sensitivity_errors(per_batch: Sequence[dict], units: Units, pairs: Sequence[tuple[int, int]]) -> dict[str, float]:
    """Per layer: the largest over ``pairs`` of the standard error of its share of the summed sensitivity,
    over the larger of that share and 1/L (L layers), from per-batch traces (``hutchinson.batch_traces``'
    layout). Under two batches there is no spread: every error is infinite.

    The share is a ratio of means, mean_b Ω_b(l) / mean_b S_b with S_b = Σ_l Ω_b(l); its standard error the
    usual one of a ratio estimator, sqrt(Σ_b (Ω_b(l) − share·S_b)² / (n(n − 1))) / mean_b S_b. A batch whose
    hard samples raise every layer's curvature together moves no share: the program's choice does not change
    when every Ω is scaled alike."""
    names = list(units)
    n = len(per_batch)
    if n < 2:
        return {name: math.inf for name in names}
    worst = {name: 0.0 for name in names}
    floor = 1.0 / len(names)
    for w, a in pairs:
        omega = {name: [0.5 * (b[name]["weight"] * units[name]["weight"][w] + b[name]["act"] * units[name]["act"][a])
                        for b in per_batch] for name in names}
        totals = [sum(omega[name][i] for name in names) for i in range(n)]
        mean_total = statistics.fmean(totals)
        for name in names:
            if mean_total <= 0.0:
                worst[name] = math.inf
                continue
            share = statistics.fmean(omega[name]) / mean_total
            residual = sum((o - share * t) ** 2 for o, t in zip(omega[name], totals, strict=True))
            spread = math.sqrt(residual / (n * (n - 1))) / mean_total
            worst[name] = max(worst[name], spread / max(share, floor))
    return worst
