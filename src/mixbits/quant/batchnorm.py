"""BatchNorm whose inference is one multiply and one add per element, as the exported graph computes it.

PyTorch's own BatchNorm kernel runs inference as one fused multiply-add per element (a single rounding),
which no ONNX operator expresses; onnxruntime's BatchNormalization rounds in its own places. A value one
rounding apart from PyTorch's flips the next low-bit quantizer whenever it lies on a midpoint between two
levels, so ``quantize_model`` gives every BatchNorm this inference instead: a scale and a shift per
channel, each made by correctly rounded operations (add, sqrt, divide, multiply, subtract), then
``x * scale`` and ``+ shift`` as two operations. Exported, they trace to the same operations on the same
constants, so with the quantized layers' integer form (layers.py) onnxruntime reproduces PyTorch to the
bit. Training, and inference without running statistics, are BatchNorm's own.
"""

from __future__ import annotations

from torch import Tensor, nn


class _TwoRoundingInference:
    """Mixed into a BatchNorm class ahead of it: inference with running statistics as multiply, then add."""

    def forward(self, x: Tensor) -> Tensor:
        if self.training or self.running_mean is None:
            return super().forward(x)
        std = (self.running_var + self.eps).sqrt()
        scale = 1.0 / std if self.weight is None else self.weight / std
        shift = -(self.running_mean * scale) if self.bias is None else self.bias - self.running_mean * scale
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return (x * scale.view(shape)).add_(shift.view(shape))


class TwoRoundingBatchNorm1d(_TwoRoundingInference, nn.BatchNorm1d):
    pass


class TwoRoundingBatchNorm2d(_TwoRoundingInference, nn.BatchNorm2d):
    pass


_COUNTERPART = {nn.BatchNorm1d: TwoRoundingBatchNorm1d, nn.BatchNorm2d: TwoRoundingBatchNorm2d}


def two_rounding_batchnorms(model: nn.Module) -> None:
    """Give every plain BatchNorm1d/2d of ``model`` the two-rounding inference, in place. Only the class
    changes (no state is added), so parameters, buffers, hooks and checkpoints stay as they are."""
    for module in model.modules():
        counterpart = _COUNTERPART.get(type(module))
        if counterpart is not None:
            module.__class__ = counterpart
