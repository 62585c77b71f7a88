"""`mixbits cost`: the per-layer cost table of a model under a policy (MACs, params, bits, BitOPs share).

    mixbits cost --model resnet20 --policy uniform:4 [--input-shape 1,28,28] [--latency-table lut.json]
    mixbits cost runs/w4a4 --budget "bitops<=uniform:3;size<=100KB"

With --budget, each budget is checked for feasibility in the default search space (W2..6 A2..6,
first and last layer at 8 bits) and the policy is reported as within it or not (exit code 0 either way).
"""

from __future__ import annotations

import argparse

from ..budget import check_feasible, parse_budgets
from ..config import QuantConfig
from ..cost import LatencyTable, cost_summary, cost_table, format_cost_table, profile
from ..errors import MixbitsError
from ..models import create
from ..pipeline import load_trained, search_space, training_space


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", nargs="?", help="run directory or checkpoint (uses its model and policy)")
    p.add_argument("--model", default="resnet20", help="registered model name (when no run is given)")
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--input-shape", default="1,28,28", help="C,H,W of one input sample (default: Fashion-MNIST)")
    p.add_argument("--policy", default="uniform:8", help="uniform:4, uniform:w4a8, or a policy JSON file")
    p.add_argument("--latency-table", help="latency table JSON; adds its total to the summary")
    p.add_argument("--budget", help="check the policy against budgets, e.g. 'bitops<=uniform:3' or "
                                    "'bitops<=0.35G;size<=100KB' (see the README for the forms)")


def run(args) -> int:
    if args.run:
        _, card, _ = load_trained(args.run)
        model, shape, policy = card.float_model(), card.example_input(), card.policy
        if policy is None:
            raise MixbitsError(f"{args.run} is a float run; give --policy to price it, without the run argument")
    else:
        shape = _shape(args.input_shape)
        model = create(args.model, num_classes=args.num_classes, in_chans=shape[0])
        _, policy = training_space(model, QuantConfig(), args.policy)
    stats = profile(model, shape)
    latency = LatencyTable.load(args.latency_table) if args.latency_table else None
    budgets = parse_budgets(args.budget) if args.budget is not None else []  # "" is an error, as in search
    # a run's recorded input finds every layer reading it (the "first" layers held at 8 bits), as its search did
    space = search_space(model, QuantConfig(), example_input=shape if args.run else None)
    if latency is not None:
        latency.check_layers(space)
    for budget in budgets:  # every budget checked before anything is printed
        check_feasible(budget, stats, space, latency)
    print(format_cost_table(cost_table(stats, policy), totals=cost_summary(stats, policy)))
    if latency is not None:
        print(f"latency: {latency.cost(policy):.4g} {latency.unit}")
    for budget in budgets:
        slack = budget.slack(stats, policy, space, latency)
        verdict = "within" if budget.satisfied(stats, policy, space, latency) else "OVER"
        details = ", ".join(f"{metric} slack {value:.4g}" for metric, value in slack.items())
        print(f"budget {budget}: {verdict} ({details})")
    return 0


def _shape(text: str) -> tuple[int, int, int]:
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise MixbitsError(f"--input-shape {text!r} must be three positive integers C,H,W, e.g. 1,28,28 or 3,32,32")
    return shape
