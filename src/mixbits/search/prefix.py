"""Scoring a policy from the outputs of the leading blocks it shares with an anchor policy.

A greedy walk scores every neighbour of its current policy, and a neighbour differs from it in one layer
only: every block that runs before that layer computes exactly what it computed for the current policy.
:class:`PrefixReuse` records the output of each block ("unit": a child of the model, with
``nn.Sequential`` / ``nn.ModuleList`` containers opened) for the anchor policy on the scored batches, and
while a neighbour is scored it lets the units before the first changed one return those outputs instead
of running. ResNet stages cost about the same, so a neighbour runs about half the network on average.

Exact only when a unit's output depends on its input alone, which holds at inference with BatchNorm on
batch statistics (``PolicyEvaluator(bn_mode="batch")``), not with per-policy recalibration (that
re-estimates statistics in every layer). A model whose units are not each called once per forward (a
shared module, a recurrent use) is scored without reuse.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from ..data.batches import call_model, to_device
from ..quant import quant_layers
from ..space import Policy

_CONTAINERS = (nn.Sequential, nn.ModuleList)


def execution_units(model: nn.Module, sample: torch.Tensor) -> list[tuple[str, nn.Module]]:
    """The model's units in the order one forward of ``sample`` runs them; [] when one runs other than once."""
    units = list(_units(model, ""))
    order: list[int] = []
    tensors: list[bool] = []
    handles = [module.register_forward_pre_hook(lambda *_, i=i: order.append(i)) for i, (_, module) in
               enumerate(units)]
    handles += [module.register_forward_hook(lambda _m, _i, out: tensors.append(isinstance(out, torch.Tensor)))
                for _, module in units]
    try:
        with torch.inference_mode():
            call_model(model, sample)
    finally:
        for handle in handles:
            handle.remove()
    if sorted(order) != list(range(len(units))) or not all(tensors):
        return []
    return [units[i] for i in order]


def _units(module: nn.Module, prefix: str) -> Iterator[tuple[str, nn.Module]]:
    for name, child in module.named_children():
        full = f"{prefix}{name}"
        if isinstance(child, _CONTAINERS):
            yield from _units(child, full + ".")
        else:
            yield full, child


class PrefixReuse:
    """Per scored batch, the outputs of every unit under the anchor policy; see the module docstring."""

    def __init__(self, model: nn.Module, sample: torch.Tensor):
        self.units = execution_units(model, sample)
        self.unit_of = {layer: next(i for i, (unit, _) in enumerate(self.units)
                                    if layer == unit or layer.startswith(unit + "."))
                        for layer in quant_layers(model)} if self.units else {}
        self.anchor: Policy | None = None
        self.outputs: list[list[torch.Tensor]] = []  # [batch][unit]
        self.skipped = 0  # unit runs avoided (the tests check that reuse happens)

    @property
    def active(self) -> bool:
        return bool(self.units)

    def record(self, policy: Policy, model: nn.Module, batches: list, device: torch.device) -> None:
        """Run ``policy`` (already applied to ``model``) on ``batches`` and keep every unit's outputs."""
        self.anchor, self.outputs = None, []
        for x, _ in batches:
            outputs: list[torch.Tensor] = []
            # copies: the model's own code may modify a unit's output in place after the hook has seen it
            handles = [module.register_forward_hook(lambda _m, _i, out, keep=outputs: keep.append(out.detach().clone()))
                       for _, module in self.units]
            try:
                call_model(model, to_device(x, device))
            finally:
                for handle in handles:
                    handle.remove()
            self.outputs.append(outputs)
        self.anchor = policy

    def shared_units(self, policy: Policy) -> int:
        """How many leading units run exactly as under the anchor (0 without an anchor)."""
        if self.anchor is None:
            return 0
        changed = [self.unit_of[name] for name in self.unit_of if policy[name] != self.anchor[name]]
        return min(changed, default=len(self.units))

    @contextlib.contextmanager
    def replaying(self, batch_index: int, count: int) -> Iterator[None]:
        """While open, the first ``count`` units return their recorded outputs for batch ``batch_index``."""
        replaced = []
        try:
            for i, (_, module) in enumerate(self.units[:count]):
                recorded = self.outputs[batch_index][i]
                # a copy, so code that modifies the output in place (ReLU(inplace=True)) keeps the record
                module.forward = lambda *_args, _out=recorded, **_kwargs: _out.clone()
                replaced.append(module)
            self.skipped += len(replaced)
            yield
        finally:
            for module in replaced:
                del module.forward
