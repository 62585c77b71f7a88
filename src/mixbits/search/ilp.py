"""Exact per-layer bit-width choice under budgets, as an integer program (scipy.optimize.milp, HiGHS).

One binary x[l, k] per searchable layer l and candidate k, exactly one per layer:

    minimise   Σ_l Σ_k  x[l,k] · score[l,k]
    subject to Σ_l Σ_k  x[l,k] · cost_m[l,k]  <=  limit_m − fixed_m     for every capped metric m

Costs are additive over layers (BitOPs, size, latency tables all are), so the program is exact. No
external solver binary is needed; 100 layers × 25 candidates with two caps solves in about a second.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from ..errors import MixbitsError


def solve_choice(scores: np.ndarray, costs: Mapping[str, np.ndarray], limits: Mapping[str, float],
                 names: Sequence[str] = ()) -> np.ndarray:
    """Index of the chosen candidate per layer (shape L) minimising total score under every limit.

    ``scores`` and each ``costs[m]`` are L × K arrays (use +inf score or cost to forbid a candidate);
    ``limits[m]`` is what the searchable layers may spend on metric m.
    """
    n_layers, n_cands = scores.shape
    allowed = np.isfinite(scores) & np.all([np.isfinite(c) for c in costs.values()], axis=0)
    if not allowed.any(axis=1).all():
        bad = [names[i] if names else i for i in np.flatnonzero(~allowed.any(axis=1))]
        raise MixbitsError(f"layers {bad} have no allowed candidate")
    c = np.where(allowed, scores, 0.0).ravel()
    from scipy.optimize import Bounds, LinearConstraint, milp  # here: scipy takes half a second to import

    constraints = [LinearConstraint(np.kron(np.eye(n_layers), np.ones(n_cands)), 1, 1)]  # one choice per layer
    for metric, limit in limits.items():
        row = np.where(allowed, costs[metric], 0.0).ravel()
        constraints.append(LinearConstraint(row[None, :], -np.inf, limit))
    upper = allowed.ravel().astype(float)  # forbidden candidates are pinned to 0
    res = milp(c, constraints=constraints, integrality=np.ones_like(c), bounds=Bounds(0, upper))
    if res.status != 0 or res.x is None:
        cheapest = {m: float(np.where(allowed, costs[m], np.inf).min(axis=1).sum()) for m in limits}
        raise MixbitsError(f"no per-layer choice meets the limits {dict(limits)} (cheapest possible: {cheapest}; "
                           f"solver: {res.message}); raise the budget or allow lower bit-widths")
    return np.round(res.x).reshape(n_layers, n_cands).argmax(axis=1)
