"""GPTQ (Frantar et al., 2022) in the group-wise format of ``mixbits.lm.groupwise``.

Columns are quantized left to right; each one's rounding error, divided by the matching diagonal entry of the
upper Cholesky factor of the inverse input Hessian, is spread over the columns not yet quantized, so the
layer's output error ``‖X(Ŵ−W)ᵀ‖²`` on the calibration inputs shrinks, not the weight error. A group's scale
and zero point are taken (min/max, as RTN) from its columns as updated when the group is reached.
"""

from __future__ import annotations

import torch
from torch import nn

from .evaluate import run_with_hooks
from .groupwise import GroupFormat, QuantizedWeight, _grouped, encode, group_params


def gptq_quantize(weight: torch.Tensor, bits: int, fmt: GroupFormat, hessian: torch.Tensor,
                  damp: float = 0.01) -> QuantizedWeight:
    w = weight.detach().float().clone()
    rows, cols = w.shape
    h = hessian.double().clone()
    dead = h.diagonal() == 0  # inputs that are always zero: their weights never matter
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damp * h.diagonal().mean() * torch.eye(cols, dtype=h.dtype)  # the usual 1% damping keeps it invertible
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).float()
    size = fmt.group_size
    codes = torch.zeros(rows, -(-cols // size) * size, dtype=torch.uint8)
    scales, zeros = [], []
    for start in range(0, cols, size):
        end = min(start + size, cols)
        scale, zero = group_params(_grouped(w[:, start:end], size), bits, fmt)
        scales.append(scale[:, 0])
        zeros.append(zero[:, 0])
        s, z = scale[:, 0], zero[:, 0]  # (rows, 1)
        for i in range(start, end):
            q = encode(w[:, i:i + 1], s, z, bits)
            codes[:, i:i + 1] = q
            err = (w[:, i:i + 1] - (q.float() - z) * s) / u[i, i]
            w[:, i + 1:] -= err * u[i, i + 1:]
    if cols % size:  # pad the short last group with its last code, as the other quantizers do
        codes[:, cols:] = codes[:, cols - 1:cols]
    grouped = codes.reshape(rows, -1, size)
    return QuantizedWeight(grouped, torch.stack(scales, 1).half(), torch.stack(zeros, 1).half(), bits, (rows, cols))


@torch.no_grad()
def input_hessians(model: nn.Module, layers: dict[str, nn.Module], batches: list[torch.Tensor]) -> dict:
    """Name -> Σ xᵀx / tokens over each linear layer's calibration inputs (embeddings get none: RTN)."""
    sums = {n: None for n, m in layers.items() if isinstance(m, nn.Linear)}
    counts = dict.fromkeys(sums, 0)

    def keep(name):
        def hook(module, args, out):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            sums[name] = x.T @ x if sums[name] is None else sums[name] + x.T @ x
            counts[name] += x.shape[0]
        return hook

    run_with_hooks(model, {layers[n]: keep(n) for n in sums}, batches)
    return {n: sums[n] / counts[n] for n in sums}
