"""How hard does DNAS's cost term pull against its task loss, per layer? The two parts of the logits' gradient.

    python benchmarks/experiments/dnas_pull.py --models resnet20 mobilenetv2

DNAS's loss CE·β·(log Cost)^γ, Cost = cost_scale·E[BitOPs]/cap, has the gradient
β·(log Cost)^γ·∇CE (the task part) + β·CE·γ·(log Cost)^(γ−1)·∇Cost/Cost (the cost part) on each layer's
logits. Adam steps each logit by about its rate in the direction of the sum's sign, so a layer's bits
follow the cost only where the cost part outweighs the task part. On the medium front's float model
(benchmarks/front-state/<model>-medium/float.pt) quantized at fitted steps, the logits at their uniform start,
budget bitops<=uniform:2.5, Gumbel-softmax masks at τ = 1: both parts averaged over 8 training batches of
128 (the average is what Adam's momentum follows), then per layer the norm of the cost part over the norm of
the task part, for each (cost_scale, γ). Writes benchmarks/experiments/results/dnas-pull.json and .md.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).resolve().parents[1])]  # experiments/, benchmarks/
from arch_rate import add_model_arguments, float_model, medium_batches  # noqa: E402
from common import EXPERIMENT_RESULTS, markdown_table, write_report  # noqa: E402

from mixbits.budget import parse_budget  # noqa: E402
from mixbits.cost import profile  # noqa: E402
from mixbits.quant import fit_steps, quant_layers, quantize_model  # noqa: E402
from mixbits.search import SearchContext  # noqa: E402
from mixbits.search.differentiable import (  # noqa: E402
    ArchParams,
    ExpectedCost,
    apply_mixture,
    clear_mixture,
    cost_ratios,
    gumbel_softmax,  # noqa: E402
)
from mixbits.search.dnas import DnasOptions  # noqa: E402
from mixbits.space import SearchSpace  # noqa: E402

SETTINGS = ((10.0, 0.6), (1.1, 0.6), (1.1, 1.2))  # (cost_scale, gamma): the former default, then the steps to the new


def gradient_parts(name: str, batches, budget_text: str, cost_scale: float, gamma: float,
                   tau: float) -> tuple[list, list, list]:
    """Per layer: (norm of the mean cost part, norm of the mean task part, the layer's share of the MACs)."""
    model = float_model(name)
    space = SearchSpace.from_model(model, example_input=batches[0][0][:1])
    qmodel = quantize_model(model, space)
    fit_steps(qmodel, batches[0][0])
    qmodel.train()
    budget = parse_budget(budget_text)
    ctx = SearchContext(model=qmodel, space=space, stats=profile(model, (1, 28, 28)), budgets=[budget],
                        train_loader=None, val_loader=None, float_model=model)
    arch = ArchParams(space.searchable, space.w_bits, space.a_bits)
    cost = ExpectedCost(ctx, arch.pairs)
    limits = budget.limits(ctx.stats, space, None)
    layers = [quant_layers(qmodel)[n] for n in space.searchable]
    opts = DnasOptions(cost_scale=cost_scale, gamma=gamma)
    params = [arch.w, arch.a]
    cost_sum, task_sum = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
    gen = torch.Generator().manual_seed(0)
    try:
        for x, y in batches:
            probs = arch.probs(lambda logits: gumbel_softmax(logits, tau, gen))
            apply_mixture(layers, probs)
            ce = torch.nn.functional.cross_entropy(qmodel(x), y)
            ratio = torch.stack(list(cost_ratios(cost(probs.pairs), limits).values())).max()
            factor = opts.beta * torch.log(cost_scale * ratio).clamp_min(0.01).float() ** opts.gamma
            task = torch.autograd.grad(factor.detach() * ce, params, retain_graph=True)
            pull = torch.autograd.grad(ce.detach() * factor, params)
            for s, g in zip(task_sum, task, strict=True):
                s += g / len(batches)
            for s, g in zip(cost_sum, pull, strict=True):
                s += g / len(batches)
    finally:
        clear_mixture(layers)
    macs = [ctx.stats.layers[n].macs for n in space.searchable]
    cost_norm = torch.cat(cost_sum, dim=1).norm(dim=1).tolist()
    task_norm = torch.cat(task_sum, dim=1).norm(dim=1).tolist()
    return cost_norm, task_norm, [m / sum(macs) for m in macs]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    p.add_argument("--budget", default="bitops<=uniform:2.5")
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--tau", type=float, default=1.0)
    args = p.parse_args(argv)
    batches = medium_batches(args, args.batches)
    rows = []
    for name, (scale, gamma) in itertools.product(args.models, SETTINGS):
        cost_norm, task_norm, share = gradient_parts(name, batches, args.budget, scale, gamma, args.tau)
        ratio = [c / t if t > 0 else float("inf") for c, t in zip(cost_norm, task_norm, strict=True)]
        rows.append({"model": name, "cost_scale": scale, "gamma": gamma, "layers": len(ratio),
                     "median_cost_over_task": statistics.median(ratio),
                     "layers_cost_wins": sum(r > 1 for r in ratio),
                     "macs_share_cost_wins": sum(s for r, s in zip(ratio, share, strict=True) if r > 1),
                     "cost_over_task_largest_layer": ratio[max(range(len(share)), key=share.__getitem__)]})
        print(rows[-1], flush=True)
    header = (f"DNAS's gradient on the logits at the uniform start, split into its cost part and its task part "
              f"(means over {args.batches} training batches of 128, Gumbel-softmax masks at τ = {args.tau}, "
              f"{args.budget}, medium float models at fitted steps). Per layer the norm of the cost part over the "
              "task part's; layers_cost_wins: layers where the cost part is the larger; macs_share_cost_wins: "
              "their share of the searchable layers' MACs; cost_over_task_largest_layer: at the layer with the "
              "most MACs.")
    write_report("dnas-pull", header, markdown_table(rows, list(rows[0])), {"args": vars(args), "rows": rows},
                 directory=EXPERIMENT_RESULTS)


if __name__ == "__main__":
    main()
