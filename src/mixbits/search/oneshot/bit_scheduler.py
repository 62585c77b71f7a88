"""Policy sampling for the weight-sharing supernet and the dynamic bit-width scheduler (seed 002, Eq. 6-7).

Unstable-weight criterion of layer l (Eq. 6), over the candidate weight bit-widths b with step γ_b:

    U_l = Σ_b s(b) · (1/|W_l|) · #{w ∈ W_l : |w/γ_b − m(w)| ≤ ε/2}

where m(w) is the quantization bound (midpoint between two adjacent levels of the b-bit grid) nearest to
w/γ_b, i.e. a weight is unstable when its rounding error is at least (1 − ε)/2 steps. s(b) = 1/2^(b−1)
(paper) or 1/b (``unstable_scale: inverse``). Weights clipped beyond the outermost level are stable:
only bounds between levels of the grid count. At each freezing event the Top-K layers by U (Eq. 7) lose
their smallest weight bit-width until the next event; every other layer gets its full set back. K =
⌊ratio · L + ½⌋, the ratio falling on a cosine from ``freeze_ratio_start`` at the first event to
``freeze_ratio_end`` at the last. Events are at fractions of training: the first after ``freeze_start``,
then every ``freeze_period`` (our choice; the released code uses fixed epochs).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from ...quant import QuantLayer, integer_range
from ...space import Bits, SearchSpace
from ...train import Hook, TrainState


def unstable_fraction(weight: Tensor, step: Tensor, bits: int, epsilon: float) -> float:
    """Share of ``weight`` within ε/2 steps of a bound between two levels of the signed ``bits``-bit grid."""
    qmin, qmax = integer_range(bits, signed=True)
    scaled = weight.detach().float() / step.detach().float()
    nearest_bound = (torch.floor(scaled) + 0.5).clamp(qmin + 0.5, qmax - 0.5)
    return float(((scaled - nearest_bound).abs() <= epsilon / 2).float().mean())


def bit_scale(bits: int, kind: str) -> float:
    return 1.0 / 2 ** (bits - 1) if kind == "power" else 1.0 / bits


def unstable_weight_criterion(weight: Tensor, steps: Mapping[int, Tensor], epsilon: float,
                              scale: str = "power") -> float:
    """Eq. 6 for one layer: ``steps`` maps each candidate weight bit-width to its step (broadcastable)."""
    return sum(bit_scale(b, scale) * unstable_fraction(weight, step, b, epsilon) for b, step in steps.items())


def layer_criterion(layer: QuantLayer, epsilon: float, scale: str = "power") -> float:
    quant = layer.w_quant
    steps = {b: quant.step(b, layer.weight.dim()) for b in quant.candidates}
    return unstable_weight_criterion(layer.weight, steps, epsilon, scale)


def freeze_ratio(event: int, events: int, start: float, end: float) -> float:
    """Cosine from ``start`` at event 0 to ``end`` at the last event."""
    if events <= 1:
        return start
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * event / (events - 1)))


def freeze_count(ratio: float, layers: int) -> int:
    """K = ratio·L rounded half up (Python's round() would send 2.5 to 2)."""
    return int(math.floor(ratio * layers + 0.5))


def event_steps(total_steps: int, freeze_start: float, freeze_period: float) -> list[int]:
    """The optimiser steps at which freezing events happen (distinct, within training)."""
    steps, j = [], 0
    while freeze_start + j * freeze_period < 1.0:
        step = int(round((freeze_start + j * freeze_period) * total_steps))
        if step < total_steps and (not steps or step > steps[-1]):
            steps.append(step)
        j += 1
    return steps


class PolicySampler:
    """Draws (w, a) per searchable layer uniformly from its available candidates and sets the layers.

    Frozen weight bit-widths are unavailable; every draw comes from ``generator`` (the loop's, seeded).
    """

    def __init__(self, layers: Mapping[str, QuantLayer], space: SearchSpace):
        self.layers, self.space = dict(layers), space
        self.frozen: dict[str, int] = {}  # layer -> weight bit-width unavailable in this period
        self.sampled_w: dict[str, dict[int, int]] = {}  # this period's weight bit-width counts per layer

    def available_w(self, name: str) -> tuple[int, ...]:
        return tuple(b for b in self.space.w_bits if b != self.frozen.get(name))

    def smallest_w(self, name: str) -> int:
        return self.available_w(name)[0]

    def largest(self) -> dict[str, Bits]:
        return {n: (self.space.w_bits[-1], self.space.a_bits[-1]) for n in self.layers}

    def smallest(self) -> dict[str, Bits]:
        """Every layer at its smallest available weight bits (frozen ones excluded) and lowest activation bits."""
        return {n: (self.smallest_w(n), self.space.a_bits[0]) for n in self.layers}

    def sample(self, generator: torch.Generator) -> dict[str, Bits]:
        bits = {}
        for name in self.layers:
            w_options, a_options = self.available_w(name), self.space.a_bits
            w = w_options[int(torch.randint(len(w_options), (1,), generator=generator))]
            a = a_options[int(torch.randint(len(a_options), (1,), generator=generator))]
            bits[name] = (w, a)
            counts = self.sampled_w.setdefault(name, {})
            counts[w] = counts.get(w, 0) + 1
        return bits

    def apply(self, bits: Mapping[str, Bits]) -> None:
        for name, (w, a) in bits.items():
            self.layers[name].set_bits(w, a)


class BitWidthScheduler(Hook):
    """Freezes the Top-K unstable layers' smallest weight bit-width per period; logs every period."""

    def __init__(self, sampler: PolicySampler, epsilon: float, scale: str, ratio_start: float, ratio_end: float,
                 freeze_start: float, freeze_period: float):
        self.sampler = sampler
        self.epsilon, self.scale = epsilon, scale
        self.ratio_start, self.ratio_end = ratio_start, ratio_end
        self.freeze_start, self.freeze_period = freeze_start, freeze_period
        self.events: list[int] = []
        self.periods: list[dict] = []
        self._next = 0

    def on_train_start(self, state: TrainState) -> None:
        self.events = event_steps(state.cfg.epochs * state.steps_per_epoch, self.freeze_start, self.freeze_period)
        if not self.periods and (not self.events or self.events[0] > state.step):
            self._open_period(state, {}, {}, k=0)  # warm-up: every bit-width trains
        self._catch_up(state)

    def state_dict(self) -> dict:
        """The periods so far and the next event: a resumed run freezes exactly what the first would have."""
        return {"periods": self.trace(), "next": self._next}

    def load_state_dict(self, state: dict) -> None:
        self._next = int(state["next"])
        self.periods = [{**p, "sampled_w": {n: {int(b): c for b, c in counts.items()}
                                            for n, counts in p["sampled_w"].items()}} for p in state["periods"]]
        if self.periods:  # the open period goes on: its frozen bits and the counts it is still collecting
            self.sampler.frozen = dict(self.periods[-1]["frozen"])
            self.sampler.sampled_w = self.periods[-1]["sampled_w"]

    def after_step(self, state: TrainState) -> None:
        self._catch_up(state)

    def _catch_up(self, state: TrainState) -> None:
        while self._next < len(self.events) and state.step >= self.events[self._next]:
            self._freeze(state, self._next)
            self._next += 1

    def _freeze(self, state: TrainState, event: int) -> None:
        names = list(self.sampler.layers)
        with torch.no_grad():
            scores = {n: layer_criterion(self.sampler.layers[n], self.epsilon, self.scale) for n in names}
        ratio = freeze_ratio(event, len(self.events), self.ratio_start, self.ratio_end)
        k = freeze_count(ratio, len(names)) if len(self.sampler.space.w_bits) > 1 else 0
        ranked = sorted(range(len(names)), key=lambda i: (-scores[names[i]], i))  # ties: layer order
        frozen = {names[i]: self.sampler.space.w_bits[0] for i in ranked[:k]}
        self._open_period(state, frozen, scores, k, ratio)

    def _open_period(self, state: TrainState, frozen: dict[str, int], scores: dict[str, float], k: int,
                     ratio: float = 0.0) -> None:
        self.sampler.frozen = dict(frozen)
        self.sampler.sampled_w = {}
        self.periods.append({"period": len(self.periods), "step": state.step,
                             "epoch": state.step / max(1, state.steps_per_epoch), "k": k, "ratio": ratio,
                             "frozen": dict(frozen), "criterion": scores, "sampled_w": self.sampler.sampled_w})

    def trace(self) -> list[dict]:
        """The periods as JSON-ready dicts (bit-width keys as strings)."""
        return [{**p, "sampled_w": {n: {str(b): c for b, c in sorted(counts.items())}
                                    for n, counts in p["sampled_w"].items()}} for p in self.periods]
