"""Does a differentiable search decide within its length? The automatic architecture rate, and how far
the bit-width distributions moved.

The automatic rate (``arch_lr: null``, the default of DNAS, SSPS and DMPQ). Adam moves a parameter whose
gradient keeps its sign by about its rate a step, whatever the gradient's size. A layer counts as decided
when one candidate holds probability ``DECIDED`` (0.8), which it does once that candidate's logit has moved
d up and the others d down from their common start (``softmax_walk``: d = ½·ln(0.8/0.2·(K − 1)), 1.39 for
K = 5 candidates; ``dirichlet_walk`` for DMPQ's mean of a Dirichlet with concentration elu(α) + 1: 1.76).
The rate is d / (``decide_fraction`` · architecture steps), so a steadily pushed layer is decided within
that share of the search, however short or long: the rule SDQ's automatic DBP rate follows
(``sdq/searcher.py``). A fixed rate of 0.01 moves a logit by at most 0.4 in the medium benchmark's 40
architecture steps, and the distributions stay near uniform; in a 10-epoch search of 54,000 images
(3,400 steps) it could move it by 34.

Movement. Per searchable layer: the entropy of its (w, a) pair distribution at the start (uniform, since the
architecture parameters start at zero) and at the end, and its largest pair probability at the end. The
search's ``entropy_drop`` is the mean over layers of 1 − H_end / H_start; below ``NEAR_START`` the search
ended close to where it began, its policy comes from repair and fill more than from what it learned, and it
says so (an ``UnmovedSearchWarning`` and ``near_start: true`` in the budget's trace).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

from torch import Tensor

DECIDED = 0.8  # the probability of one candidate at which a layer counts as decided
NEAR_START = 0.1  # a mean entropy drop below this: the search ended near its start


class UnmovedSearchWarning(UserWarning):
    """A differentiable search ended with its bit-width distributions close to their uniform start."""


def softmax_walk(candidates: int, decided: float = DECIDED) -> float:
    """The d for which softmax over one logit at +d and ``candidates`` − 1 at −d gives the first ``decided``."""
    return 0.5 * math.log(decided / (1.0 - decided) * max(1, candidates - 1))


def dirichlet_walk(candidates: int, decided: float = DECIDED) -> float:
    """The d for which one α at +d and the others at −d give the first candidate mean probability ``decided``
    under concentration elu(α) + 1: (1 + d) / (1 + d + (K − 1)·e^(−d)) = decided, solved by bisection (the
    left side rises with d)."""
    target = max(1, candidates - 1) * decided / (1.0 - decided)
    low, high = 0.0, 50.0
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if (1 + mid) * math.exp(mid) < target else (low, mid)
    return (low + high) / 2


def automatic_rate(walk: float, architecture_steps: float, decide_fraction: float) -> float:
    """The Adam rate that walks a steadily pushed logit ``walk`` within ``decide_fraction`` of the steps."""
    return walk / max(1.0, decide_fraction * architecture_steps)


def _entropy(p: Tensor) -> Tensor:
    return -(p * p.clamp_min(1e-12).log()).sum(-1)


def distribution_movement(layers: Sequence[str], pair_probs: Tensor,
                          pairs: Sequence[tuple[int, int]] | None = None) -> dict:
    """How far each layer's pair distribution moved from the uniform start (the module docstring says how);
    with ``pairs`` (the (w, a) of each column) also each layer's most likely pair, ``argmax``."""
    end = pair_probs.detach().double().cpu()
    count = end.shape[-1]
    start_entropy = math.log(count) if count > 1 else 0.0
    end_entropy = _entropy(end)
    largest, best = end.max(dim=-1)
    per_layer = {}
    for name, h, p, k in zip(layers, end_entropy, largest, best, strict=True):
        per_layer[name] = {"entropy_start": start_entropy, "entropy_end": float(h), "p_max_end": float(p)}
        if pairs is not None:
            per_layer[name]["argmax"] = list(pairs[int(k)])
    drop = (1.0 - float(end_entropy.mean()) / start_entropy) if start_entropy > 0 else 1.0
    return {"entropy_drop": drop, "p_max_mean": float(largest.mean()), "p_uniform": 1.0 / count,
            "near_start": drop < NEAR_START, "layers": per_layer}


def warn_if_near_start(method: str, budget: str, movement: dict, arch_lr: float | None) -> None:
    """An ``UnmovedSearchWarning`` naming the budget, how little moved and what to change."""
    if not movement["near_start"]:
        return
    rate = f"arch_lr {arch_lr:.3g}" if arch_lr is not None else "arch_lr"
    warnings.warn(f"{method}: at budget {budget} the bit-width distributions ended near their uniform start "
                  f"(mean entropy drop {movement['entropy_drop']:.1%}, under {NEAR_START:.0%}; largest pair "
                  f"probability {movement['p_max_mean']:.3f} on average, uniform {movement['p_uniform']:.3f}), so "
                  f"its policy comes mostly from repair and fill; search longer (epochs), or raise {rate} "
                  "(null: the automatic rate, see decide_fraction)", UnmovedSearchWarning, stacklevel=3)


def recorded_rate(history: list[dict]) -> float | None:
    """The architecture rate a search's per-epoch trace records (None when it recorded none)."""
    rates = [e["arch_lr"] for e in history if "arch_lr" in e]
    return rates[-1] if rates else None

