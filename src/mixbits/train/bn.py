"""BatchNorm statistics recalibration for weight-sharing supernets."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..data.batches import call_model, model_input, to_device

# Training batches a subnet of a supernet re-estimates its BatchNorm statistics on before it is used.
SUBNET_BN_BATCHES = 32


def recalibrate_bn(model: nn.Module, batches: Iterable, num_batches: int | None = None,
                   device: str | torch.device = "cpu", forward: Callable | None = None) -> int:
    """Re-estimate every BatchNorm's running statistics from ``batches``; return how many batches were used.

    Statistics are reset and then accumulated as an equal-weight average over the batches (momentum=None),
    which is what a sampled subnet of a supernet needs before it is evaluated. Only the BatchNorm layers
    are put in training mode; every other module stays in eval mode so dropout or quantizer observers
    neither skew the statistics nor change state. Momentum and all training flags are restored.
    ``batches`` yields tensors or ``(x, y, ...)`` tuples; ``forward(batch)`` runs the model on any other batch
    (e.g. a user's loss function). A model with no tracked BN returns 0 at once.
    """
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if not bns or num_batches == 0:
        return 0
    device = torch.device(device)
    was_training = {m: m.training for m in model.modules()}
    momenta = [bn.momentum for bn in bns]
    used = 0
    try:
        model.eval()
        for bn in bns:
            bn.momentum = None
            bn.train()
        with torch.no_grad():
            for batch in batches:
                if num_batches is not None and used >= num_batches:
                    break
                if used == 0:  # reset only once data arrives: an empty iterable leaves the stats alone
                    for bn in bns:
                        bn.reset_running_stats()
                if forward is not None:
                    forward(batch)
                else:
                    call_model(model, to_device(model_input(batch), device))
                used += 1
    finally:
        for bn, momentum in zip(bns, momenta, strict=True):
            bn.momentum = momentum
        for m, flag in was_training.items():
            m.training = flag
    return used
