"""The numerical check of an exported ONNX graph against the PyTorch model: per layer, then end to end."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import torch
from torch import nn

from ..data.batches import call_model, first_rows
from ..errors import AdvisedError, MixbitsError
from ..quant import quant_layers
from .fused import fast_layer_model
from .inputs import GraphInputs, as_numpy, output_tensors
from .locate import against_optimized, against_pytorch, padded
from .qdq import LayerSpec, QTypes, layer_model, session


def _batches(inputs):
    """(inputs, labels or None) per batch of a tensor, a dict of input tensors, or an iterable of batches."""
    if isinstance(inputs, (torch.Tensor, dict)):
        yield inputs, None
        return
    for item in inputs:
        if isinstance(item, (tuple, list)):
            yield item[0], (item[1] if len(item) > 1 else None)
        else:
            yield item, None


def first_batch(inputs) -> tuple[tuple, object]:
    """(the first (x, y) batch of ``inputs``, all batches again with it first)."""
    batches = _batches(inputs)
    first = next(batches, None)
    if first is None:
        raise MixbitsError("check_inputs yielded no samples; give an input batch or a loader of batches")
    return first, itertools.chain([first], batches)


@torch.no_grad()
def check_layers(model: nn.Module, specs: dict[str, LayerSpec], types: dict[str, QTypes], opset: int,
                 x: torch.Tensor, tolerance: float = 1e-3, form: str = "exact") -> dict:
    """Each quantized layer's QDQ subgraph alone, fed the very input PyTorch gave that layer.

    With identical inputs the integer codes are identical, and the integer form (quant/layers.py) makes
    the outputs identical too: a layer off by more than ``tolerance`` is named. (End to end, a float op
    between layers that rounds differently in the two runtimes can flip an activation sitting exactly
    between two levels in a later layer; ``check_onnx`` allows for those.) In the fast form a convolution's
    output is requantized to int8 at 1/127 of its largest value, and it may differ from PyTorch by at most one
    of those levels (``layer_max_levels``; the int32 bias and the requantization multiplier round there).
    """
    layers, seen = quant_layers(model), {}

    def record(name):
        def hook(module, inputs, output):
            seen.setdefault(name, (inputs[0], output))  # the first call of a layer used several times
        return hook

    hooks = [layer.register_forward_hook(record(name)) for name, layer in layers.items() if name in specs]
    try:
        call_model(model, x)
    finally:
        for h in hooks:
            h.remove()
    worst = {"layer_max_rel_diff": 0.0, "worst_layer": None, "layer_max_levels": 0.0}
    for name, (inp, ref) in seen.items():
        inp, largest = padded(layers[name], inp), max(float(ref.abs().max()), 1e-12)
        level = largest / 127
        proto = (layer_model(specs[name], types[name], opset, tuple(inp.shape)) if form == "exact" else
                 fast_layer_model(specs[name], types[name], opset, tuple(inp.shape), level))
        got = torch.from_numpy(session(proto.SerializeToString()).run(None, {"x": as_numpy(inp)})[0])
        rel = float((got - ref).abs().max()) / largest
        worst["layer_max_levels"] = max(worst["layer_max_levels"], rel * 127)
        if rel > (tolerance if form == "exact" else 1.001 / 127):
            raise AdvisedError(f"layer {name!r} alone differs from PyTorch by {rel:.2g} of its largest output "
                               f"(tolerance {tolerance:g}) with types {types[name].describe()}",
                               [("opset=13", "--opset 13")] if opset != 13 else [])
        if rel >= worst["layer_max_rel_diff"]:
            worst.update(layer_max_rel_diff=rel, worst_layer=name)
    return worst


SESSIONS = {"default": True, "unoptimized": False}  # name -> onnxruntime graph optimisations on (as deployed)


@dataclass
class _Tally:
    """One session's differences from PyTorch, accumulated over batches."""

    n_outputs: int
    inputs: GraphInputs
    diffs: list = field(default_factory=list)  # per batch: per output, max |diff| per sample
    scales: list = field(default_factory=list)  # per output: largest |PyTorch value|
    agree: int = 0
    correct: int = 0
    worst: tuple = (0.0, None, None)  # (max |diff|, batch, per-sample |diff|): where to look for the first node

    def add(self, x, ref: list[torch.Tensor], got: list[torch.Tensor], y) -> None:
        per_sample = [(r - g).abs().reshape(r.shape[0], -1).amax(1) for r, g in zip(ref, got, strict=True)]
        self.diffs.append(per_sample)
        self.scales = [max(a, float(r.abs().max())) for a, r in
                       zip(self.scales or [0.0] * self.n_outputs, ref, strict=True)]
        badness = per_sample[0]
        if class_scores(ref[0]):
            pred_ref, pred_got = ref[0].argmax(-1), got[0].argmax(-1)
            self.agree += int((pred_ref == pred_got).sum())
            if y is not None and y.shape == pred_got.shape:
                self.correct += int((pred_got == y).sum())
            badness = torch.where(pred_ref != pred_got, float("inf"), badness)  # a changed top-1 first
        if float(badness.max()) > self.worst[0] or self.worst[1] is None:
            self.worst = (float(badness.max()), x, badness)

    def samples_to_locate(self, count: int = 8):
        _, x, badness = self.worst
        return self.inputs.rows(x, badness.argsort(descending=True)[:count])


def class_scores(out: torch.Tensor) -> bool:
    """Whether a first output reads as class scores, (N, classes): then top-1 agreement is compared too.
    Any other output (a segmentation map, a sequence, a regression) is compared by relative error only."""
    return out.dim() == 2 and out.shape[1] > 1 and out.is_floating_point()


@torch.no_grad()
def check_onnx(model: nn.Module, onnx_model: bytes | str | Path, inputs, outputs=("output",),
               tolerance: float = 1e-3, max_mismatch: float = 0.5, min_agreement: float = 99.0,
               graph_inputs: GraphInputs | None = None, form: str = "exact") -> dict:
    """Run the ONNX file with onnxruntime (CPU) as deployed and unoptimised, and PyTorch, on the same inputs.

    Both onnxruntime sessions are compared with PyTorch: the default one (graph optimisations at
    onnxruntime's default level, what users deploy) in the top-level fields, the unoptimised one under
    ``unoptimized``. A sample "differs" when some output of it is off by more than ``tolerance`` times
    that output's largest |value| over all samples. Where a float op between layers rounds differently
    in the two runtimes, an activation lying within rounding error of a midpoint between two levels can
    land on the other level; a few samples then differ by about one quantization step. A wrong graph makes most
    samples differ instead: more than ``max_mismatch`` (a fraction) of them, or a top-1 agreement below
    ``min_agreement`` percent, in either session raises, naming the first node that differs. Returns
    max |diff|, its relative size, the differing samples, top-1 agreement (when the first output is
    class scores, (N, classes); else None), and both accuracies when labels are given. ``graph_inputs``
    maps a batch's inputs (a tensor, tuple or dict) to the graph's inputs; default one tensor ``input``.
    ``form``: the export's form; a fast one that fails is also told what its own rounding does.
    """
    graph_inputs = graph_inputs if graph_inputs is not None else GraphInputs(("input",), "tensor")
    data = onnx_model if isinstance(onnx_model, bytes) else Path(onnx_model).read_bytes()
    sessions = {name: session(data, optimize=on) for name, on in SESSIONS.items()}
    tallies = {name: _Tally(len(outputs), graph_inputs) for name in sessions}
    was_training, counts = model.training, {"samples": 0, "labelled": 0, "correct_torch": 0, "class_scores": False}
    model.eval()
    try:
        for x, y in _batches(inputs):
            ref = [t.float() for t in output_tensors(call_model(model, x))]
            feeds = graph_inputs.feeds(x)
            for name, sess in sessions.items():
                got = [torch.from_numpy(a).float() for a in sess.run(list(outputs), feeds)]
                tallies[name].add(x, ref, got, y)
            counts["samples"] += ref[0].shape[0]
            counts["class_scores"] = class_scores(ref[0])
            if y is not None and class_scores(ref[0]) and y.shape == ref[0].shape[:1]:
                counts["labelled"] += int(y.numel())
                counts["correct_torch"] += int((ref[0].argmax(-1) == y).sum())
        if counts["samples"] == 0:
            raise MixbitsError("check_inputs yielded no samples; give an input batch or a loader of batches")
        limits = (tolerance, max_mismatch, min_agreement)
        verdicts = {name: _verdict(tally, counts, outputs, limits) for name, tally in tallies.items()}
        failed = [name for name, (_, problems) in verdicts.items() if problems]
        if failed:
            _raise_mismatch(model, data, verdicts, tallies[failed[-1]], failed, outputs, tolerance, form)
    finally:
        model.train(was_training)
    default = verdicts["default"][0]
    return {**default, "unoptimized": {k: v for k, v in verdicts["unoptimized"][0].items() if k not in _SHARED}}


_SHARED = ("samples", "output_scale", "tolerance", "top1_torch")  # the same for both sessions


def _verdict(tally: _Tally, counts: dict, outputs, limits) -> tuple[dict, list[str]]:
    """(figures, problems) of one session."""
    tolerance, max_mismatch, min_agreement = limits
    n = counts["samples"]
    class_scores_seen = counts["class_scores"]
    diffs = [torch.cat([batch[i] for batch in tally.diffs]) for i in range(len(outputs))]
    rel = [d / max(s, 1e-12) for d, s in zip(diffs, tally.scales, strict=True)]
    worst = max(range(len(outputs)), key=lambda i: float(rel[i].max()))
    result = {"samples": n, "max_abs_diff": max(float(d.max()) for d in diffs), "output_scale": tally.scales[0],
              "rel_diff": float(rel[worst].max()), "worst_output": outputs[worst],
              "differing_samples": int(torch.stack([r > tolerance for r in rel]).any(0).sum()),
              "top1_agreement": 100.0 * tally.agree / n if class_scores_seen else None, "tolerance": tolerance}
    if counts["labelled"]:
        result["top1_torch"] = 100.0 * counts["correct_torch"] / counts["labelled"]
        result["top1_onnx"] = 100.0 * tally.correct / counts["labelled"]
    problems = []
    if result["differing_samples"] > max_mismatch * n:
        problems.append(f"{result['differing_samples']} of {n} samples differ by more than {tolerance:g} of the "
                        f"largest output (at most {100 * max_mismatch:g} % may)")
    if class_scores_seen and result["top1_agreement"] < min_agreement:
        problems.append(f"top-1 agreement is {result['top1_agreement']:.2f} % (at least {min_agreement:g} % needed)")
    return result, problems


_SAID = {"default": "under onnxruntime's default graph optimisations (as deployed)",
         "unoptimized": "with onnxruntime's graph optimisations disabled"}


# The fast form's own departures from PyTorch (docs/export.md, "Why the CNNs fall short"): enough on some models
# (MobileNetV2) to fail the check with a graph that is right.
FAST_FORM_ROUNDING = ("in the fast form this can also be its own rounding, which PyTorch does not do: residual "
                      "streams carried in 8 bits, and each QLinearConv's int32 bias and output multiplier flip outputs "
                      "that sit at a rounding midpoint, a flip that a later low-bit quantizer makes a whole level")


def _raise_mismatch(model, data: bytes, verdicts: dict, tally: _Tally, failed: list[str], outputs,
                    tolerance: float, form: str = "exact") -> None:
    """Say how each session fared and where the graph first departs from its reference; the file is not written."""
    lines = []
    for name, (figures, problems) in verdicts.items():
        agreement = figures["top1_agreement"]
        said = "; ".join(problems) if problems else (
            "matches" + (f" (top-1 agreement {agreement:.2f} %)" if agreement is not None else ""))
        lines.append(f"{_SAID[name]}: {said}, max |diff| {figures['max_abs_diff']:.3g} at output "
                     f"{figures['worst_output']!r}")
    x, advice = tally.samples_to_locate(), []
    if "unoptimized" in failed:  # the graph itself computes something else than the model's forward
        lines.append(_describe(against_pytorch(model, data, x, tally.inputs.feeds(x), tolerance), "PyTorch"))
        lines.append("the float ops traced between those two differ from what the model's forward computes "
                     "(Python control flow that depends on the data, or an op exported differently)")
    else:  # the graph is right; one of onnxruntime's rewrites changes the numbers
        lines.append(_describe(against_optimized(data, tally.inputs.feeds(x), tolerance), "the unoptimised graph"))
        opset = next(o.version for o in onnx.load_from_string(data).opset_import if o.domain in ("", "ai.onnx"))
        advice = [("opset=13", "--opset 13")] if opset != 13 else []  # int8 containers everywhere
    if form == "fast":
        lines.append(FAST_FORM_ROUNDING)
        advice.append(("form='exact'", "--form exact"))
    raise AdvisedError(f"the ONNX graph does not match PyTorch {'; '.join(lines)}. The file was not written",
                       advice)


def _describe(where: dict | None, reference: str) -> str:
    if where is None:
        return f"no intermediate tensor differs from {reference}; only the outputs do"
    text = f"first node that differs from {reference}: {where['node']!r} ({where['op_type']}"
    text += f" of the input of layer {where['layer']!r}" if where["layer"] else ""
    text += f"), max |diff| {where['max_abs_diff']:.3g}"
    if where["after"]:
        text += f", after {where['after']!r} which agrees"
    if where.get("rewritten"):
        text += f"; the optimiser rewrote in between: {', '.join(where['rewritten'][:8])}"
    return text


def _check(model, data: bytes, inputs, graph: tuple, layers, limits: tuple[float, float, float]) -> dict:
    """``graph``: (GraphInputs, output names) of the exported graph; ``layers``: (specs, types, opset, form)."""
    graph_inputs, outputs = graph
    first, batches = first_batch(inputs)
    specs, types, opset, form = layers
    was_training = model.training
    try:
        per_layer = check_layers(model.eval(), specs, types, opset, first_rows(first[0], 64), limits[0], form)
    finally:
        model.train(was_training)
    result = check_onnx(model, data, batches, outputs, *limits, graph_inputs=graph_inputs, form=form)
    return {**result, **per_layer}
