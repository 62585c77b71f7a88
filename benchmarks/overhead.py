"""Cost of quantization in training: one step of ResNet-20 (batch 128) as a ratio to the FP32 step.

    python benchmarks/overhead.py [--batch 128] [--pairs 20] [--fused/--no-fused] [--compile/--no-compile]
                                  [--epochs/--no-epochs] [--epoch-pairs 4] [--epoch-batches 8] [--threads N]
                                  [--retain-memory/--no-retain-memory] [--variants NAME ...] [--name overhead]

Each variant is one entry of VARIANTS (a search method adds its row there). Time is the median ratio
of interleaved steps in one process; memory is the ratio of bytes autograd saves for backward
(on a GPU: peak allocated memory), which is what grows with quantizers on the activation path.
A variant with its own ``train_step(x, y)`` (the one-shot supernet's default pair of steps: four passes in all,
each backpropagated before the next) is timed by it, and its memory is that of one forward.
Two modes: eager (the quantizers' own fused kernels), and whole-model torch.compile (`train.compile`),
each against FP32 run the same way. In each mode a whole fine-tune epoch through the shared loop (Fashion-
MNIST batches, augmentation and the optimiser included) is timed as well, uniform W4A4 against FP32.
Every ratio is reported next to the noise floor: FP32 against itself, measured the same way.
Freed memory stays in the process while it measures (``retained_memory``), as while the training loop runs on a
CPU; ``--no-retain-memory`` measures malloc's default instead (MIXBITS_RETAIN_MEMORY=0, the training loop too).
Writes benchmarks/results/<name>.json and <name>.md (default name: overhead).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, markdown_table, ratio, write_result  # noqa: E402

from mixbits import Policy, SearchSpace  # noqa: E402
from mixbits.compiler import compile_model  # noqa: E402
from mixbits.data import DataConfig, build_loaders  # noqa: E402
from mixbits.models import create  # noqa: E402
from mixbits.quant import apply_policy, calibrate, quant_layers, quantize_model, set_fused  # noqa: E402
from mixbits.search.differentiable import ArchParams, apply_mixture, softmax_rows  # noqa: E402
from mixbits.search.oneshot.bit_scheduler import PolicySampler  # noqa: E402
from mixbits.search.sdq import BitParams, drive, set_current_bits  # noqa: E402
from mixbits.train import TrainConfig, fit  # noqa: E402
from mixbits.train.memory import retained_memory  # noqa: E402


def fp32(model: nn.Module, x: torch.Tensor) -> nn.Module:
    return model


def calibrated(model: nn.Module, x: torch.Tensor) -> tuple[nn.Module, SearchSpace]:
    """``model`` quantized over the default W2-6 x A2-6 space and calibrated on ``x``."""
    space = SearchSpace.from_model(model)
    qmodel = quantize_model(model, space)
    calibrate(qmodel, x)
    return qmodel, space


def uniform_w4a4(model: nn.Module, x: torch.Tensor) -> nn.Module:
    qmodel, space = calibrated(model, x)
    return apply_policy(qmodel, Policy.uniform(space, 4))


def mixed_policy(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """A random per-layer W2-6/A2-6 policy: the fine-tuning step of every searched (uniform, hawq, random) policy."""
    qmodel, space = calibrated(model, x)
    gen = torch.Generator().manual_seed(0)
    overrides = {n: tuple(int(b) for b in torch.randint(2, 7, (2,), generator=gen)) for n in space.searchable}
    return apply_policy(qmodel, Policy.from_rules(space, (4, 4), overrides))


class MixtureSearchNet(nn.Module):
    """The supernet of the differentiable searches (dnas, ssps, dmpq): every searchable layer runs the composite
    convolution of its W2-6 x A2-6 candidates, mixed by softmax probabilities of learnable logits."""

    def __init__(self, qmodel: nn.Module, space: SearchSpace):
        super().__init__()
        self.qmodel, self.arch = qmodel, ArchParams(space.searchable, space.w_bits, space.a_bits)
        layers = quant_layers(qmodel)
        self.searchable = [layers[n] for n in space.searchable]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        apply_mixture(self.searchable, self.arch.probs(softmax_rows))
        return self.qmodel(x)


def mixture_search(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """One single-level weight + architecture step of the differentiable searches."""
    return MixtureSearchNet(*calibrated(model, x)).to(x.device)


class StochasticSearchNet(nn.Module):
    """The SDQ search step: every searchable layer's weights and activations quantized stochastically between their
    current and next lower W2-6 / A2-6 candidates (straight-through Gumbel-sigmoid on learnable DBPs)."""

    def __init__(self, qmodel: nn.Module, space: SearchSpace):
        super().__init__()
        self.qmodel = qmodel
        self.w_dbps, self.a_dbps = BitParams(space.searchable, space.w_bits), BitParams(space.searchable, space.a_bits)
        layers = quant_layers(qmodel)
        self.searchable = [layers[n] for n in space.searchable]
        set_current_bits(self.searchable, self.w_dbps, self.a_dbps, None)  # every layer starts at its highest bits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        drive(self.searchable, self.w_dbps.sample(tau=1.0), self.a_dbps.sample(tau=1.0), self.w_dbps, self.a_dbps)
        return self.qmodel(x)


def sdq_search(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """One weight + DBP step of the SDQ search (its regulariser, ~20 scalar operations, left out)."""
    return StochasticSearchNet(*calibrated(model, x)).to(x.device)


class SampledPolicyNet(nn.Module):
    """One pass of the one-shot supernet step: a policy drawn per layer from W2-6 x A2-6 at every forward.
    A whole supernet step is (largest + smallest + policies_per_step) such passes on the same batch."""

    def __init__(self, qmodel: nn.Module, space: SearchSpace):
        super().__init__()
        self.qmodel = qmodel
        layers = quant_layers(qmodel)
        self.sampler = PolicySampler({n: layers[n] for n in space.searchable}, space)
        self.generator = torch.Generator().manual_seed(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.sampler.apply(self.sampler.sample(self.generator))
        return self.qmodel(x)


def oneshot_pass(model: nn.Module, x: torch.Tensor) -> nn.Module:
    return SampledPolicyNet(*calibrated(model, x)).to(x.device)


class SupernetStepNet(SampledPolicyNet):
    """Two one-shot supernet steps with the default options less IDM (``sandwich_every: 2``): the sandwich step,
    the largest policy (CE), the smallest and 1 sampled (½ CE + ½ KL to the largest's output), then a step of
    1 sampled policy (CE); each pass backpropagated at once. Timed as one unit: its ratio covers two steps."""

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.sampler.apply(self.sampler.largest())
        teacher = self.qmodel(x)
        nn.functional.cross_entropy(teacher, y).backward()
        target = teacher.detach().log_softmax(-1)
        for bits in [self.sampler.smallest(), self.sampler.sample(self.generator)]:
            self.sampler.apply(bits)
            logits = self.qmodel(x)
            kl = nn.functional.kl_div(logits.log_softmax(-1), target, log_target=True, reduction="batchmean")
            (0.5 * nn.functional.cross_entropy(logits, y) + 0.5 * kl).backward()
        self.sampler.apply(self.sampler.sample(self.generator))
        nn.functional.cross_entropy(self.qmodel(x), y).backward()


def oneshot_step(model: nn.Module, x: torch.Tensor) -> nn.Module:
    return SupernetStepNet(*calibrated(model, x)).to(x.device)


EPOCH_FP32, EPOCH_W4A4 = "fp32 fine-tune epoch", "uniform W4A4 fine-tune epoch (mixbits.finetune's loop)"
ONESHOT_PASS = "one-shot supernet, per sampled-policy pass"
ONESHOT_STEP = "one-shot supernet, 2 default steps (largest + smallest + 1 sampled; 1 sampled)"
# A new policy every forward recompiles the whole model, and the supernet trains eager, so no compiled rows.
EAGER_ONLY = {ONESHOT_PASS, ONESHOT_STEP}
# name -> builder(float model, sample batch) -> model to train; FP32 must stay first (the base).
VARIANTS: dict[str, Callable[[nn.Module, torch.Tensor], nn.Module]] = {
    "fp32": fp32, "uniform W4A4": uniform_w4a4, "mixed W2-6/A2-6 (searched policies' QAT)": mixed_policy,
    "composite mixture (dnas/ssps/dmpq search step)": mixture_search, "sdq search step": sdq_search,
    ONESHOT_PASS: oneshot_pass, ONESHOT_STEP: oneshot_step}


def make_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    """One optimiser step: the model's own ``train_step(x, y)`` (its backward passes) if it has one, else CE."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train()

    def step():
        opt.zero_grad(set_to_none=True)
        if hasattr(model, "train_step"):
            model.train_step(x, y)
        else:
            nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    return step


def saved_bytes(step_model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    """Bytes autograd keeps for backward in one forward (or peak CUDA memory on a GPU)."""
    if x.is_cuda:
        torch.cuda.reset_peak_memory_stats()
        make_step(step_model, x, y)()
        return torch.cuda.max_memory_allocated()
    total = 0
    seen = set()

    def pack(t):
        nonlocal total
        key = (t.untyped_storage().data_ptr(), t.dtype)
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        nn.functional.cross_entropy(step_model(x), y).backward()
    return total


def build_mode(args, x, y, compiled: bool) -> dict[str, Callable[[], None]]:
    """Every variant's step, all models run the same way (eager or whole-model compiled), each run twice so
    that compiling is over before anything is timed."""
    variants = {name: build for name, build in VARIANTS.items() if not (compiled and name in EAGER_ONLY)
                and (not args.variants or name == "fp32" or name in args.variants)}
    models = {name: build(create(args.model, 10, 1).to(args.device), x) for name, build in variants.items()}
    if compiled:
        for model in models.values():
            compile_model(model)
    steps = {name: make_step(m, x, y) for name, m in models.items()}
    for step in steps.values():
        step(), step()
    return {"models": models, "steps": steps}


def build_epochs(args, x, compiled: bool) -> dict[str, Callable[[], None]]:
    """One fine-tune epoch through the shared loop (``fit``: data loading, optimiser, schedule, logging), FP32 and
    uniform W4A4, each run once so that compiling is over before anything is timed."""
    train = build_loaders(DataConfig(root=args.data_dir, batch_size=args.batch,
                                     max_train_samples=args.epoch_batches * args.batch), seed=0)[0]
    cfg = TrainConfig(epochs=1, lr=0.01, compile=compiled)
    models = {EPOCH_FP32: create(args.model, 10, 1).to(args.device),
              EPOCH_W4A4: uniform_w4a4(create(args.model, 10, 1).to(args.device), x)}

    def epoch(model):
        return lambda: fit(model, train, cfg, device=args.device, progress=False)

    runs = {name: epoch(model) for name, model in models.items()}
    for run in runs.values():
        run()
    return {"models": models, "steps": runs}


def measure(args, built: dict, x, y, mode: str) -> list[dict]:
    """Each entry against the first (FP32, which against itself is the noise floor, reported next to every ratio)."""
    models, steps = built["models"], built["steps"]
    base_name = next(iter(steps))
    base_mem = saved_bytes(models[base_name], x, y)
    rows = []
    for name in steps:
        r = ratio(steps[base_name], steps[name], pairs=args.pairs, warmup=args.warmup)
        mem = saved_bytes(models[name], x, y)
        noise = rows[0]["raw"] if rows else r
        rows.append({"variant": name, "mode": mode, "time ratio": r["ratio"],
                     "IQR": f"{r['iqr'][0]:.2f}-{r['iqr'][1]:.2f}",
                     "noise floor": f"{noise['ratio']:.2f} ({noise['iqr'][0]:.2f}-{noise['iqr'][1]:.2f})",
                     "ms": r["other_ms"], "memory ratio": mem / base_mem, "raw": r})
        print(f"{mode} {name}: {r['ratio']:.3f}x (IQR {r['iqr'][0]:.3f}-{r['iqr'][1]:.3f}; FP32 against itself "
              f"{noise['ratio']:.3f}x), memory {mem / base_mem:.2f}x", flush=True)
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--pairs", type=int, default=20)
    p.add_argument("--epoch-pairs", type=int, default=4, help="pairs of whole fine-tune epochs")
    p.add_argument("--epoch-batches", type=int, default=8, help="batches per timed fine-tune epoch")
    p.add_argument("--model", default="resnet20")
    p.add_argument("--data-dir", default=None, help="Fashion-MNIST directory for the fine-tune epoch")
    p.add_argument("--fused", action=argparse.BooleanOptionalAction, default=True,
                   help="compiled single-pass quantizer kernels in eager mode (default: on)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="also measure whole-model torch.compile, FP32 compiled as the base (default: on)")
    p.add_argument("--epochs", action=argparse.BooleanOptionalAction, default=True,
                   help="also measure the fine-tune epoch in each mode (default: on)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's, one per core)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--retain-memory", action=argparse.BooleanOptionalAction, default=True,
                   help="keep freed memory in the process, as the training loop does on a CPU (default: on)")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS)[1:], metavar="VARIANT",
                   help="time only these step variants against fp32, e.g. 'uniform W4A4' (default: all)")
    p.add_argument("--name", default="overhead", help="result file name, without extension (default: overhead)")
    args = p.parse_args(argv)
    if not args.retain_memory:
        os.environ["MIXBITS_RETAIN_MEMORY"] = "0"  # the training loop reads it when it starts
    with retained_memory() as retained:
        run(args, retained)


def run(args, retained: bool) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    set_fused(args.fused)
    x = torch.randn(args.batch, 1, 28, 28, device=args.device)
    y = torch.randint(0, 10, (args.batch,), device=args.device)
    modes = [False, True] if args.compile else [False]
    # Everything is built and compiled first and timed after, so the timed part runs without compiler work.
    built = []
    for compiled in modes:
        mode = "compiled" if compiled else "eager"
        # warm-up before timing: a step has run twice in build_mode and runs three more times; an epoch once and once
        built.append((mode, build_mode(args, x, y, compiled), args.pairs, 3))
        if args.epochs:
            built.append((mode, build_epochs(args, x, compiled), args.epoch_pairs, 1))
    print("timing starts", flush=True)
    rows = []
    for mode, models, pairs, warmup in built:
        rows += measure(argparse.Namespace(**{**vars(args), "pairs": pairs, "warmup": warmup}), models, x, y, mode)
    print("timing ends", flush=True)
    table = markdown_table(rows, ["variant", "mode", "time ratio", "IQR", "noise floor", "ms", "memory ratio"])
    header = (f"{args.model}, batch {args.batch}, {args.device}, {torch.get_num_threads()} threads, fused quantizer "
              f"kernels={args.fused}, freed memory retained={retained}, {args.pairs} step pairs, {args.epoch_pairs} "
              f"epoch pairs of {args.epoch_batches} batches")
    print(f"\n{header}\n\n{table}")
    write_result(args.name, {"args": vars(args), "rows": rows, "table": table})
    (RESULTS / f"{args.name}.md").write_text(f"# Quantization overhead\n\n{header}\n\n{table}\n")


if __name__ == "__main__":
    main()
