"""Where does DMPQ's task loss come from? The skip connection and the Dirichlet samples, one at a time.

    python benchmarks/experiments/dmpq_loss.py --models resnet20 mobilenetv2

On the medium front's float model (benchmarks/front-state/<model>-medium/float.pt), no training: the task loss
on 4 batches of the medium preset's training images (BatchNorm on batch statistics, as during the search) of
the quantized model at fitted steps, every searchable layer mixed
- by the mean of Dirichlet(1) (the uniform mixture DMPQ starts from), with DMPQ's decaying skip at a fixed
  weight (1.0 at the search's start, 0.5 halfway, 0 at its end), the shortcut raw or rescaled to the
  convolution output's spread (``skip_scale``): what the skip alone does to a network trained without it;
- by one Dirichlet(1) sample per batch (what DMPQ trains through), against a DNAS-style Gumbel-softmax sample
  at τ = 5 and 1, without the skip;
- every layer decided on W4A4 (mean probability 0.8): the Dirichlet mean against a Dirichlet sample and a
  Gumbel-softmax sample at τ = 0.2 (DNAS's last temperature): what the sampling noise costs late in a search.
Writes benchmarks/experiments/results/dmpq-loss.json and .md.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
from pathlib import Path

import torch
from torch.distributions import Dirichlet

sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).resolve().parents[1])]  # experiments/, benchmarks/
from arch_rate import add_model_arguments, float_model, medium_batches  # noqa: E402
from common import EXPERIMENT_RESULTS, markdown_table, write_report  # noqa: E402

from mixbits.quant import fit_steps, quant_layers, quantize_model  # noqa: E402
from mixbits.search.convergence import dirichlet_walk  # noqa: E402
from mixbits.search.differentiable import ArchParams, apply_mixture, clear_mixture, gumbel_softmax  # noqa: E402
from mixbits.search.dmpq import SKIP_SCALES, DecayingSkip, concentration  # noqa: E402
from mixbits.space import SearchSpace  # noqa: E402

SKIP_WEIGHTS = (0.0, 0.05, 0.1, 0.25, 0.5, 1.0)


def mean_loss(model, batches, before=None) -> float:
    losses = []
    model.train()  # batch statistics, as in the search's forward
    with torch.no_grad():
        for x, y in batches:
            if before is not None:
                before()
            losses.append(float(torch.nn.functional.cross_entropy(model(x), y)))
    return statistics.fmean(losses)


def quantized(name: str, batches):
    model = float_model(name)
    space = SearchSpace.from_model(model, example_input=batches[0][0][:1])
    qmodel = quantize_model(model, space)
    fit_steps(qmodel, batches[0][0])
    layers = [quant_layers(qmodel)[n] for n in space.searchable]
    return qmodel, layers, ArchParams(space.searchable, space.w_bits, space.a_bits)


def uniform(logits):
    return torch.full_like(logits, 1.0 / logits.shape[-1])


def loss_rows(name: str, batches) -> list[dict]:
    qmodel, layers, arch = quantized(name, batches)
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    mixings = {
        "Dirichlet(1) mean": lambda: arch.probs(uniform),
        "Dirichlet(1) sample": lambda: arch.probs(lambda logits: Dirichlet(torch.ones_like(logits)).sample()),
        "Gumbel tau=5 sample": lambda: arch.probs(lambda logits: gumbel_softmax(logits, 5.0, gen)),
        "Gumbel tau=1 sample": lambda: arch.probs(lambda logits: gumbel_softmax(logits, 1.0, gen)),
    }
    rows = []
    try:
        for scale, weight in itertools.product(SKIP_SCALES, SKIP_WEIGHTS):  # DMPQ's skip, at the mean mixture
            if weight == 0 and scale != SKIP_SCALES[0]:
                continue
            skip = DecayingSkip(layers, "none", weight, scale)
            try:
                apply_mixture(layers, arch.probs(uniform).detach())
                rows.append({"model": name, "skip_scale": scale if weight else "-", "skip_weight": weight,
                             "mixing": "Dirichlet(1) mean", "loss": mean_loss(qmodel, batches)})
            finally:
                skip.remove()
        for label, draw in list(mixings.items())[1:]:
            loss = mean_loss(qmodel, batches, before=lambda draw=draw: apply_mixture(layers, draw().detach()))
            rows.append({"model": name, "skip_scale": "-", "skip_weight": 0.0, "mixing": label, "loss": loss})
        rows += decided_rows(name, qmodel, layers, arch, batches)
    finally:
        clear_mixture(layers)
    return rows


def decided_rows(name: str, qmodel, layers, arch: ArchParams, batches) -> list[dict]:
    """Every layer decided on W4 and A4 (mean probability 0.8, ``convergence.dirichlet_walk``; the same logits
    under softmax give it 0.47): the mean mixture against one sample per batch."""
    d = dirichlet_walk(len(arch.w_bits))
    with torch.no_grad():
        for logits, bits in ((arch.w, arch.w_bits), (arch.a, arch.a_bits)):
            logits.fill_(-d)
            logits[:, bits.index(4)] = d
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    mixings = {
        "decided W4A4: Dirichlet mean": lambda: arch.probs(lambda a: concentration(a) / concentration(a).sum(-1, True)),
        "decided W4A4: Dirichlet sample": lambda: arch.probs(lambda a: Dirichlet(concentration(a)).sample()),
        "decided W4A4: Gumbel tau=0.2 sample": lambda: arch.probs(lambda a: gumbel_softmax(a, 0.2, gen)),
    }
    return [{"model": name, "skip_scale": "-", "skip_weight": 0.0, "mixing": label,
             "loss": mean_loss(qmodel, batches, before=lambda draw=draw: apply_mixture(layers, draw().detach()))}
            for label, draw in mixings.items()]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    p.add_argument("--batches", type=int, default=4)
    args = p.parse_args(argv)
    batches = medium_batches(args, args.batches)
    rows = []
    for name in args.models:
        rows += loss_rows(name, batches)
        print(rows[-1], flush=True)
    header = (f"Task loss without training on {args.batches} training batches of 128 (BatchNorm on batch statistics), "
              "medium float models quantized at fitted steps (candidates 2-6 bits, every searchable layer mixed): "
              "DMPQ's skip at a fixed weight under the uniform mean mixture, and each sampled mixing at the "
              "uniform start without the skip.")
    write_report("dmpq-loss", header, markdown_table(rows, list(rows[0])), {"args": vars(args), "rows": rows},
                 directory=EXPERIMENT_RESULTS)


if __name__ == "__main__":
    main()
