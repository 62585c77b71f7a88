"""The loss guard: stop a run whose loss is not finite or has blown up, instead of training on garbage.

A loss is *diverged* when it exceeds ``DIVERGENCE_FACTOR`` (1000) times its early value, the mean loss of
the run's first ``EARLY_STEPS`` (10) steps, or 1 if that mean is smaller (so a run that starts near zero
loss is not stopped by a rise to 0.5). Ordinary training never comes near this: a cross-entropy starts
at ln(classes) and falls; a learning rate that is far too high sends it up by many orders of magnitude
within a few steps. The early value is part of the checkpoint, so a resumed run judges as the
uninterrupted one would.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

DIVERGENCE_FACTOR = 1e3
EARLY_STEPS = 10


@dataclass
class LossGuard:
    early_sum: float = 0.0
    early_steps: int = 0

    @property
    def limit(self) -> float:
        """The largest loss still taken as training (infinite until the first step has been seen)."""
        if self.early_steps == 0:
            return math.inf
        return DIVERGENCE_FACTOR * max(abs(self.early_sum / self.early_steps), 1.0)

    def problem(self, loss: float) -> str | None:
        """Why ``loss`` must stop training, or None; a good loss of the first steps joins the early value."""
        if not math.isfinite(loss):
            return f"training loss is {loss}"
        if loss > self.limit:
            early = self.early_sum / self.early_steps
            return (f"training diverged: loss {loss:.3g} is above {self.limit:.3g}, {DIVERGENCE_FACTOR:g} times its "
                    f"early value {early:.3g} (taken as 1 when smaller)")
        if self.early_steps < EARLY_STEPS:
            self.early_sum += loss
            self.early_steps += 1
        return None

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        self.early_sum, self.early_steps = float(state["early_sum"]), int(state["early_steps"])
