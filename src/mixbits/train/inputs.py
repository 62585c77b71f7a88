"""Checks of a user's model and batches where they enter training and scoring, each one message naming the value
and the fix, instead of whatever torch raises three calls deeper (or, for a bad label, a silently wrong loss).

They run on every batch: each is a few type and shape tests, and one min/max over the labels.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import MixbitsError

_LABEL_TYPES = (torch.int64, torch.uint8)  # the index types cross-entropy takes


def check_parameters(model: nn.Module, what: str = "the model") -> None:
    """Every floating-point parameter and buffer in float32: the quantizers and the training loop compute in it."""
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point() and tensor.dtype != torch.float32:
            raise MixbitsError(f"{what} holds {str(tensor.dtype).removeprefix('torch.')} tensors ({name!r}); mixbits "
                               "trains and quantizes float32 models: pass model.float() (export writes the integer "
                               "form, so half precision is not needed for a small file)")


def batchnorm_failure(error: ValueError, n: int, batch: int) -> MixbitsError | None:
    """torch's refusal to train BatchNorm on one value per channel (a batch of one sample after a linear layer, or
    at 1x1 resolution) in our words, naming the batch and the fix; None for any other ValueError."""
    if "Expected more than 1 value per channel" not in str(error):
        return None
    return MixbitsError(f"batch {batch + 1} of the epoch holds {n} sample{'s' * (n != 1)}, too few for BatchNorm to "
                        "train on (it needs more than one value per channel); use batches of at least 2 samples (a "
                        "DataLoader's last batch: drop_last=True)")


def check_logits(logits, targets, what: str = "the model") -> None:
    """``logits`` a (batch, classes, ...) float tensor and ``targets`` class indices in range, one per sample or per
    position of a dense output (batch, ...), or per-class probabilities of the logits' shape, as cross-entropy
    needs them."""
    if not isinstance(logits, torch.Tensor):
        raise MixbitsError(f"{what} returned a {type(logits).__name__}, not a tensor of logits; return the logits "
                           "alone (e.g. a wrapper module whose forward returns output[0]), or pass loss_fn=... that "
                           "computes the loss from whatever it returns")
    if logits.dim() < 2 or not logits.is_floating_point():
        raise MixbitsError(f"{what} returned a {str(logits.dtype).removeprefix('torch.')} tensor of shape "
                           f"{tuple(logits.shape)}; classification needs (batch, classes) float logits (or "
                           "(batch, classes, ...) for a dense output), or pass loss_fn=... for another task")
    if not isinstance(targets, torch.Tensor):
        raise MixbitsError(f"the labels of a batch are a {type(targets).__name__}; give a tensor of class indices "
                           "(torch.long), e.g. torch.tensor(labels)")
    if targets.is_floating_point() and targets.shape == logits.shape:
        return  # class probabilities (soft labels), which cross-entropy takes as they are
    if targets.dtype not in _LABEL_TYPES:
        raise MixbitsError(f"the labels of a batch are {str(targets.dtype).removeprefix('torch.')}; cross-entropy "
                           "needs class indices as torch.long (labels.long()), or class probabilities shaped like "
                           "the logits")
    expected = (logits.shape[0], *logits.shape[2:])  # classes on dim 1, as cross-entropy reads them
    if targets.shape != expected:
        raise MixbitsError(f"the labels of a batch have shape {tuple(targets.shape)}, the logits "
                           f"{tuple(logits.shape)}; give one class index per sample (per position of a dense "
                           f"output), shape {tuple(expected)}")
    classes = logits.shape[1]
    low, high = int(targets.min()), int(targets.max())
    if low < 0 or high >= classes:
        bad = low if low < 0 else high
        raise MixbitsError(f"label {bad} is outside the {classes} classes {what} outputs (0..{classes - 1}); "
                           "number the classes from 0, or give the model as many outputs as there are classes")


def check_teacher_logits(teacher_logits, logits) -> None:
    if not isinstance(teacher_logits, torch.Tensor) or teacher_logits.shape != logits.shape:
        shape = (tuple(teacher_logits.shape) if isinstance(teacher_logits, torch.Tensor)
                 else f"a {type(teacher_logits).__name__}")
        raise MixbitsError(f"the teacher returned {shape} where the model returns {tuple(logits.shape)}; distillation "
                           "needs a teacher with the same outputs (the float model), or set kd_alpha=0")


def check_loss(loss, what: str = "loss_fn") -> torch.Tensor:
    """``loss`` as a one-number float tensor; anything else (logits, a float, a tuple) is one message."""
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not loss.is_floating_point():
        got = (f"a tensor of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor)
               else f"a {type(loss).__name__}")
        raise MixbitsError(f"{what} returned {got}; it must return the loss as one number in a tensor, e.g. "
                           "F.cross_entropy(model(x), y) (a mean over the batch, not per-sample values)")
    return loss.reshape(())


def non_finite_inputs(x) -> int:
    """How many NaN or infinite values a batch's input tensors hold (0 for inputs that are not tensors)."""
    if isinstance(x, torch.Tensor):
        return int((~torch.isfinite(x)).sum()) if x.is_floating_point() else 0
    if isinstance(x, dict):
        return sum(non_finite_inputs(v) for v in x.values())
    if isinstance(x, (tuple, list)):
        return sum(non_finite_inputs(v) for v in x)
    return 0
