"""The numerical check of an exported ONNX graph against the PyTorch model: per layer, then end to end."""

from __future__ import annotations

import itertools
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import MixbitsError
from ..quant import quant_layers
from .qdq import LayerSpec, QTypes, layer_model, session


def _batches(inputs):
    if isinstance(inputs, torch.Tensor):
        yield inputs, None
        return
    for item in inputs:
        if isinstance(item, (tuple, list)):
            yield item[0], (item[1] if len(item) > 1 else None)
        else:
            yield item, None


def _as_list(out) -> list[torch.Tensor]:
    return [out] if isinstance(out, torch.Tensor) else list(out)


@torch.no_grad()
def check_layers(model: nn.Module, specs: dict[str, LayerSpec], types: dict[str, QTypes], opset: int,
                 x: torch.Tensor, tolerance: float = 1e-3) -> dict:
    """Each quantized layer's QDQ subgraph alone, fed the very input PyTorch gave that layer.

    With identical inputs the integer codes are identical, so only float summation order separates
    the two: this is where "equal up to float rounding" is checked, and the first layer that breaks
    it is named. (End to end, that rounding can flip an activation sitting exactly between two
    levels in a later layer; ``check_onnx`` allows for those.)
    """
    layers, seen = quant_layers(model), {}

    def record(name):
        def hook(module, inputs, output):
            seen.setdefault(name, (inputs[0], output))  # the first call of a layer used several times
        return hook

    hooks = [layer.register_forward_hook(record(name)) for name, layer in layers.items() if name in specs]
    try:
        model(x)
    finally:
        for h in hooks:
            h.remove()
    worst = {"layer_max_rel_diff": 0.0, "worst_layer": None}
    for name, (inp, ref) in seen.items():
        layer = layers[name]
        if isinstance(layer, nn.Conv2d) and layer.padding_mode != "zeros":
            inp = F.pad(inp, layer._reversed_padding_repeated_twice, mode=layer.padding_mode)
        proto = layer_model(specs[name], types[name], opset, tuple(inp.shape))
        got = torch.from_numpy(session(proto.SerializeToString()).run(None, {"x": inp.float().numpy()})[0])
        rel = float((got - ref).abs().max()) / max(float(ref.abs().max()), 1e-12)
        if rel > tolerance:
            raise MixbitsError(f"layer {name!r} alone differs from PyTorch by {rel:.2g} of its largest output "
                               f"(tolerance {tolerance:g}) with types {types[name].describe()}; try --opset 13")
        if rel >= worst["layer_max_rel_diff"]:
            worst = {"layer_max_rel_diff": rel, "worst_layer": name}
    return worst


@torch.no_grad()
def check_onnx(model: nn.Module, onnx_model: bytes | str | Path, inputs, outputs=("output",),
               tolerance: float = 1e-3, max_mismatch: float = 0.5, min_agreement: float = 99.0) -> dict:
    """Run the ONNX file with onnxruntime (CPU) and PyTorch on the same inputs; compare every output.

    A sample "differs" when some output of it is off by more than ``tolerance`` times that output's
    largest |value| over all samples. Float summation order differs between the runtimes, so an
    activation lying within rounding error of a midpoint between two levels can land on the other
    level; a few samples then differ by about one quantization step. A wrong graph makes most samples
    differ instead: more than ``max_mismatch`` (a fraction) of them, or a top-1 agreement below
    ``min_agreement`` percent, raises. Returns max |diff|, its relative size, the differing samples,
    top-1 agreement (first output), and both accuracies when labels are given.
    """
    data = onnx_model if isinstance(onnx_model, bytes) else Path(onnx_model).read_bytes()
    sess, was_training = session(data), model.training
    model.eval()
    diffs, scales = [[] for _ in outputs], [0.0] * len(outputs)
    counts = {"samples": 0, "agree": 0, "labelled": 0, "correct_torch": 0, "correct_onnx": 0}
    try:
        for x, y in _batches(inputs):
            ref = [t.float() for t in _as_list(model(x))]
            got = [torch.from_numpy(a) for a in sess.run(list(outputs), {"input": x.float().numpy()})]
            for i, (r, g) in enumerate(zip(ref, got, strict=True)):
                diffs[i].append((r - g).abs().reshape(r.shape[0], -1).amax(1))
                scales[i] = max(scales[i], float(r.abs().max()))
            _count(counts, ref[0].argmax(-1), got[0].argmax(-1), y)
    finally:
        model.train(was_training)
    return _verdict(counts, [torch.cat(d) for d in diffs], scales, outputs, (tolerance, max_mismatch, min_agreement))


def _count(counts: dict, pred_ref, pred_got, y) -> None:
    counts["samples"] += pred_ref.shape[0]
    counts["agree"] += int((pred_ref == pred_got).sum())
    if y is not None:
        counts["labelled"] += int(y.numel())
        counts["correct_torch"] += int((pred_ref == y).sum())
        counts["correct_onnx"] += int((pred_got == y).sum())


def _verdict(counts: dict, diffs: list[torch.Tensor], scales: list[float], outputs, limits) -> dict:
    tolerance, max_mismatch, min_agreement = limits
    n = counts["samples"]
    if n == 0:
        raise MixbitsError("check_inputs yielded no samples; give a tensor (N, C, H, W) or a loader of batches")
    rel = [d / max(s, 1e-12) for d, s in zip(diffs, scales, strict=True)]
    differ = torch.stack([r > tolerance for r in rel]).any(0)
    result = {"samples": n, "max_abs_diff": max(float(d.max()) for d in diffs), "output_scale": scales[0],
              "rel_diff": max(float(r.max()) for r in rel), "differing_samples": int(differ.sum()),
              "top1_agreement": 100.0 * counts["agree"] / n, "tolerance": tolerance}
    if counts["labelled"]:
        result["top1_torch"] = 100.0 * counts["correct_torch"] / counts["labelled"]
        result["top1_onnx"] = 100.0 * counts["correct_onnx"] / counts["labelled"]
    problems = []
    if result["differing_samples"] > max_mismatch * n:
        problems.append(f"{result['differing_samples']} of {n} samples differ by more than {tolerance:g} of the "
                        f"largest output (at most {100 * max_mismatch:g} % may)")
    if result["top1_agreement"] < min_agreement:
        problems.append(f"top-1 agreement is {result['top1_agreement']:.2f} % (at least {min_agreement:g} % needed)")
    if problems:
        worst = max(range(len(outputs)), key=lambda i: float(rel[i].max()))
        raise MixbitsError(f"ONNX output {outputs[worst]!r} does not match PyTorch: {'; '.join(problems)}; max |diff| "
                           f"{float(diffs[worst].max()):.3g} ({float(rel[worst].max()):.2g} of its largest value). "
                           "The file was not written; try --opset 13")
    return result


def _check(model, data: bytes, inputs, outputs, layers, limits: tuple[float, float, float]) -> dict:
    batches = _batches(inputs)
    first = next(batches, None)
    if first is None:
        raise MixbitsError("check_inputs yielded no samples; give a tensor (N, C, H, W) or a loader of batches")
    was_training = model.training
    try:
        per_layer = check_layers(model.eval(), *layers, first[0][:64], limits[0])
    finally:
        model.train(was_training)
    result = check_onnx(model, data, itertools.chain([first], batches), outputs, *limits)
    return {**result, **per_layer}
