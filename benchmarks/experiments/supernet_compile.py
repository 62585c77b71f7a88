"""Would a compiled supernet pay? One training step with a new policy each step, eager against compiled.

    python benchmarks/experiments/supernet_compile.py [--model resnet20] [--rounds 6] [--steps 10]

A uniform QAT run of 1,000 steps or more is torch.compiled (``train.compile: auto``), while the one-shot supernet
runs eager: its policy changes every step, and a compiled graph specialises on each layer's bits (a Python int),
so every new policy would compile again. The lever left for the front's cost is one graph for every policy: the
bits as tensors the graph reads, written in place between steps. This probe builds that form outside the library
(each searchable layer's input and weight quantizers select their step and clip bounds by an index tensor, with
a hand-written backward as the library's fused layer has) and times one optimiser step (forward, backward,
SGD) on the front's float model (benchmarks/front-state/<model>-medium/float.pt, calibrated on a training
batch), in four forms, interleaved in rounds in one process:

- supernet, eager: the library's layers, a policy drawn uniformly per layer at every step (``set_bits``);
- supernet, compiled: the probe's layers, the same policies written into their index tensors;
- uniform W4A4, eager, and uniform W4A4 compiled as ``train.compile`` does (the QAT run's two forms).

Before timing it checks that the probe computes the library's step: on one policy, the loss and every gradient
of the probe against the library's layers compiled for that policy (as ``train.compile`` does; inductor rounds
x / step as its own reciprocal product, so some codes, and the step gradients, differ from the eager layers').
Writes benchmarks/experiments/results/supernet-compile-<model>.json and .md (median milliseconds a step, the first
step's seconds with the compile, the ratios).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/
from common import EXPERIMENT_RESULTS as RESULTS  # noqa: E402
from common import front_float_model, markdown_table, metadata, write_report

from mixbits.compiler import compile_model  # noqa: E402
from mixbits.data import DataConfig, build_loaders  # noqa: E402
from mixbits.quant import QConv2d, calibrate, integer_range, quant_layers, quantize_model  # noqa: E402
from mixbits.quant.fused_layer import _layer_backward  # noqa: E402
from mixbits.quant.lsq import _backward_reduced, _forward, _reduce_dims  # noqa: E402
from mixbits.search.oneshot.bit_scheduler import PolicySampler  # noqa: E402
from mixbits.space import SearchSpace  # noqa: E402


def _lsq_backward(grad: Tensor, x: Tensor, steps: Tensor, index: Tensor, step: Tensor, lo: Tensor, hi: Tensor,
                  scale: Tensor) -> tuple[Tensor, Tensor]:
    """(grad wrt x, grad wrt the whole step table): the library's LSQ backward (quant/lsq.py), on the row ``index``
    selects."""
    grad_x, grad_step = _backward_reduced(grad, x, step, lo, hi, _reduce_dims(x, step))
    return grad_x, torch.zeros_like(steps).index_add(0, index, (grad_step * scale).reshape(1, -1))


class _IndexedWeight(torch.autograd.Function):
    """A weight quantized at the bit-width its index tensor selects (a row of the step table)."""

    @staticmethod
    def forward(ctx, w, steps, index, lo, hi, scale):
        ctx.save_for_backward(w, steps, index, lo, hi, scale)
        return _forward(w, _weight_step(w, steps, index), lo, hi)

    @staticmethod
    def backward(ctx, grad):
        w, steps, index, lo, hi, scale = ctx.saved_tensors
        grads = _lsq_backward(grad, w, steps, index, _weight_step(w, steps, index), lo, hi, scale)
        return *grads, None, None, None, None


def _weight_step(w: Tensor, steps: Tensor, index: Tensor) -> Tensor:
    return steps.index_select(0, index).view(-1, *([1] * (w.dim() - 1)))


class _IndexedLayer(torch.autograd.Function):
    """The input quantized at its index tensor's bit-width, then the convolution: keeps only the input, as the
    library's fused layer does, and remakes the quantized input in the backward."""

    @staticmethod
    def forward(ctx, x, steps, index, lo, hi, scale, weight, bias, conv):
        ctx.save_for_backward(x, steps, index, lo, hi, scale, weight)
        ctx.conv, ctx.has_bias = conv, bias is not None
        return F.conv2d(_forward(x, steps.index_select(0, index).view(1), lo, hi), weight, bias, *conv)

    @staticmethod
    def backward(ctx, grad):
        x, steps, index, lo, hi, scale, weight = ctx.saved_tensors
        step = steps.index_select(0, index).view(1)
        grad_q, grad_w, grad_b = _layer_backward(("conv", *ctx.conv), grad, _forward(x, step, lo, hi), weight,
                                                 ctx.has_bias, True, ctx.has_bias)
        grad_x, grad_steps = _lsq_backward(grad_q, x, steps, index, step, lo, hi, scale)
        return grad_x, grad_steps, None, None, None, None, grad_w, grad_b, None


def _index_tables(quantizer) -> None:
    """Buffers: the selected candidate's index (written between steps) and every candidate's clip bounds."""
    bounds = [integer_range(b, quantizer.signed) for b in quantizer.candidates]
    quantizer.register_buffer("bit_index", torch.tensor([len(bounds) - 1]), persistent=False)
    quantizer.register_buffer("lows", torch.tensor([float(lo) for lo, _ in bounds]), persistent=False)
    quantizer.register_buffer("highs", torch.tensor([float(hi) for _, hi in bounds]), persistent=False)


def _selected(quantizer, per_value: int) -> tuple[Tensor, Tensor, Tensor]:
    """(lower bound, upper bound, LSQ gradient scale 1/sqrt(values per step x q_max)) of the selected bit-width."""
    lo, hi = quantizer.lows.index_select(0, quantizer.bit_index), quantizer.highs.index_select(0, quantizer.bit_index)
    return lo, hi, torch.rsqrt(hi * per_value)


def _indexed_forward(layer: QConv2d):
    def forward(x: Tensor) -> Tensor:
        wq, aq = layer.w_quant, layer.a_quant
        lo, hi, scale = _selected(wq, layer.weight.numel() // wq.steps.shape[1])
        weight = _IndexedWeight.apply(layer.weight, wq.steps, wq.bit_index, lo, hi, scale)
        lo, hi, scale = _selected(aq, x.numel())
        conv = (layer.stride, layer.padding, layer.dilation, layer.groups)
        return _IndexedLayer.apply(x, aq.steps, aq.bit_index, lo, hi, scale, weight, layer.bias, conv)

    return forward


def indexed_supernet(model: torch.nn.Module, names: list[str]) -> torch.nn.Module:
    """A copy of ``model`` whose searchable layers take their bits from index tensors; compiled once."""
    model = copy.deepcopy(model)
    layers = quant_layers(model)
    for name in names:
        if not isinstance(layers[name], QConv2d):
            raise SystemExit(f"the probe handles searchable convolutions only; {name} is {type(layers[name])}")
        _index_tables(layers[name].w_quant)
        _index_tables(layers[name].a_quant)
        layers[name].forward = _indexed_forward(layers[name])
    compile_model(model)
    return model


def set_indexed(model: torch.nn.Module, policy: dict[str, tuple[int, int]]) -> None:
    layers = quant_layers(model)
    for name, (w, a) in policy.items():
        layers[name].w_quant.bit_index.fill_(layers[name].w_quant.index(w))
        layers[name].a_quant.bit_index.fill_(layers[name].a_quant.index(a))


def set_library(model: torch.nn.Module, policy: dict[str, tuple[int, int]]) -> None:
    layers = quant_layers(model)
    for name, (w, a) in policy.items():
        layers[name].set_bits(w, a)


class Form:
    """One model trained by SGD one step at a time, its policy set by ``apply`` before each step."""

    def __init__(self, name: str, model: torch.nn.Module, apply, policies):
        self.name, self.model, self.apply, self.policies = name, model.train(), apply, policies
        self.optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        self.seconds: list[float] = []

    def step(self, x: Tensor, y: Tensor) -> float:
        started = time.perf_counter()
        self.apply(self.model, next(self.policies))
        loss = F.cross_entropy(self.model(x), y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return time.perf_counter() - started


def sampled_policies(model: torch.nn.Module, names: list[str], space: SearchSpace, seed: int):
    """Policies drawn as the supernet draws them (``PolicySampler``, nothing frozen), from a seeded generator."""
    layers = quant_layers(model)
    sampler, gen = PolicySampler({n: layers[n] for n in names}, space), torch.Generator().manual_seed(seed)
    while True:
        yield sampler.sample(gen)


def uniform(names: list[str], bits: int):
    while True:
        yield dict.fromkeys(names, (bits, bits))


def check_same_step(library: torch.nn.Module, probe: torch.nn.Module, policy: dict, x: Tensor, y: Tensor) -> dict:
    """The probe's loss and gradients against the library's layers compiled for ``policy`` (same weights)."""
    library = copy.deepcopy(library)
    set_library(library, policy)
    compile_model(library)
    set_indexed(probe, policy)
    out, started = {}, {}
    for key, model in (("library", library), ("probe", probe)):
        started[key] = time.perf_counter()
        model.zero_grad(set_to_none=True)
        torch.manual_seed(0)  # the same dropout masks (MobileNetV2's classifier)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        out[key] = (loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        started[key] = time.perf_counter() - started[key]
    (loss_a, grads_a), (loss_b, grads_b) = out["library"], out["probe"]
    if grads_a.keys() != grads_b.keys():
        raise SystemExit(f"the probe's gradients reach other parameters: {sorted(grads_a.keys() ^ grads_b.keys())}")
    # The step gradients sum terms that nearly cancel, in another order than the library's kernels: 1e-3 apart.
    worst, where = max((float((grads_b[n] - grads_a[n]).norm() / grads_a[n].norm().clamp_min(1e-12)), n)
                       for n in grads_a)
    if abs(loss_a - loss_b) > 1e-5 * abs(loss_a) or worst > 1e-2:
        raise SystemExit(f"the probe does not compute the library's step: loss {loss_b} against {loss_a}, "
                         f"gradient of {where} {worst:.2e} apart (relative)")
    return {"loss_library": loss_a, "loss_probe": loss_b, "max_relative_grad_diff": worst, "worst_grad": where,
            "probe_first_seconds": started["probe"]}  # its compile


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet20", choices=("resnet20", "mobilenetv2"))
    parser.add_argument("--rounds", type=int, default=6, help="rounds; each times every form for --steps steps")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=128)
    args = parser.parse_args()
    float_model = front_float_model(args.model)
    if float_model is None:
        raise SystemExit(f"no front float model for {args.model}: run benchmarks/front.py --preset medium first")
    space = SearchSpace.from_model(float_model)
    names = list(space.searchable)
    x, y = next(iter(build_loaders(DataConfig(max_train_samples=args.batch, batch_size=args.batch), 0)[0]))
    library = quantize_model(float_model, space)
    calibrate(library, x)
    library.train()  # every form trains: BatchNorm on batch statistics
    probe = indexed_supernet(library, names)
    check = check_same_step(library, probe, next(sampled_policies(library, names, space, 1)), x, y)
    compiled_fixed = copy.deepcopy(library)
    compile_model(compiled_fixed)
    def policies():
        return sampled_policies(library, names, space, 0)

    forms = [Form("supernet, eager (library)", copy.deepcopy(library), set_library, policies()),
             Form("supernet, compiled, bits as tensors (probe)", probe, set_indexed, policies()),
             Form("uniform W4A4, eager (library)", copy.deepcopy(library), set_library, uniform(names, 4)),
             Form("uniform W4A4, compiled (train.compile)", compiled_fixed, set_library, uniform(names, 4))]
    first = {form.name: form.step(x, y) for form in forms}  # the uniform run compiles here; the probe did above
    first[forms[1].name] += check["probe_first_seconds"]
    for form in forms:  # warm-up
        form.step(x, y)
    for _ in range(args.rounds):
        for form in forms:
            form.seconds += [form.step(x, y) for _ in range(args.steps)]
    median = {f.name: round(1e3 * statistics.median(f.seconds), 1) for f in forms}
    base = median[forms[0].name]
    rows = [{"form": f.name, "ms a step": round(median[f.name], 1),
             "vs supernet eager": round(median[f.name] / base, 3), "first step s": round(first[f.name], 1)}
            for f in forms]
    gain = {"supernet eager / compiled": round(base / median[forms[1].name], 3),
            "uniform eager / compiled": round(median[forms[2].name] / median[forms[3].name], 3),
            "compiled supernet / compiled uniform": round(median[forms[1].name] / median[forms[3].name], 3)}
    meta = metadata()
    header = "\n".join([
        "# A compiled supernet: one training step, eager against compiled", "",
        f"`python benchmarks/experiments/supernet_compile.py --model {args.model} --rounds {args.rounds} "
        f"--steps {args.steps}` at "
        f"{meta['commit']} ({meta['date']}), {torch.get_num_threads()} threads, batch {args.batch}, median of "
        f"{args.rounds * args.steps} steps a form, interleaved in rounds. The probe's step matches the library's "
        f"(loss {check['loss_probe']:.5f} against {check['loss_library']:.5f}, largest relative gradient "
        f"difference {check['max_relative_grad_diff']:.1e}). Compiling speeds the supernet's step "
        f"{gain['supernet eager / compiled']}x and the uniform run's {gain['uniform eager / compiled']}x; compiled, "
        f"the supernet's step costs {gain['compiled supernet / compiled uniform']}x the uniform one's; "
        "\"first step s\" includes the compile (less where inductor's on-disk cache holds graphs of earlier runs)."])
    table = markdown_table(rows, ["form", "ms a step", "vs supernet eager", "first step s"])
    name = f"supernet-compile-{args.model}"
    history = earlier_runs(name) + [{"date": meta["date"], "commit": meta["commit"], "eager supernet ms": base, **gain}]
    table += ("\n\nEvery run so far (this machine's speed varies between runs; the ratios are within a run):\n\n"
              + markdown_table(history, list(history[-1])))
    payload = {"args": vars(args), "check": check, "gain": gain, "rows": rows, "history": history}
    write_report(name, header, table, payload, directory=RESULTS)


def earlier_runs(name: str) -> list[dict]:
    """The gains of the runs before this one, kept in the result file (one run alone says little here)."""
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()).get("history", []) if path.is_file() else []


if __name__ == "__main__":
    main()
