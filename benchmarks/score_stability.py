"""How many scored images the one-shot walk needs: do two scorings of the same moves rank them the same?

    python benchmarks/score_stability.py [--model resnet20] [--width 0.5] [--sizes 64,128,256,512,1024] [--repeats 5]

Trains a float model and a one-shot supernet briefly on Fashion-MNIST, then scores the moves of one walk step
(every searchable layer's w or a one candidate up or down from W4A4: 4L neighbours) the way the walk does
(``PolicyEvaluator``, each scored batch normalised by its own statistics) on two disjoint sets of N
validation images, and compares the two rankings: Spearman's ρ over all moves and whether both pick the same
best move. Repeated on up to ``--repeats`` disjoint pairs of sets per N (as many as the held-out split
holds). Writes benchmarks/results/score_stability.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).parent))
from common import markdown_table, write_result  # noqa: E402

from mixbits import Policy, SearchSpace  # noqa: E402
from mixbits.budget import parse_budgets  # noqa: E402
from mixbits.cost import profile  # noqa: E402
from mixbits.data import DataConfig, build_loaders  # noqa: E402
from mixbits.models import create  # noqa: E402
from mixbits.quant import quantize_model  # noqa: E402
from mixbits.search import PolicyEvaluator, SearchContext, run_searcher  # noqa: E402
from mixbits.search.greedy import neighbours  # noqa: E402
from mixbits.train import TrainConfig, fit  # noqa: E402
from mixbits.utils import seed_everything  # noqa: E402


def trained_supernet(args) -> tuple[torch.nn.Module, SearchSpace, object]:
    """A briefly trained float model, then a one-shot supernet trained from it; returns it, its space, val data."""
    seed_everything(0)
    data = DataConfig(max_train_samples=args.train_samples, eval_batch_size=1024)
    train, val, _, train_set = build_loaders(data, seed=0)
    width = {"width": args.width} if args.width else {}
    model = create(args.model, train_set.num_classes, train_set.in_chans, **width)
    fit(model, train, TrainConfig(epochs=args.float_epochs, lr=0.05, seed=0), progress=False)
    space = SearchSpace.from_model(model)
    ctx = SearchContext(model=quantize_model(model, space), space=space,
                        stats=profile(model, (train_set.in_chans, 28, 28)), budgets=parse_budgets("bitops<=uniform:4"),
                        train_loader=train, val_loader=val, float_model=model.eval(), progress=False,
                        options={"epochs": args.supernet_epochs, "save_supernet": False, "fill": False})
    run_searcher("oneshot", ctx)  # the model is the trained supernet afterwards
    return ctx.model, space, val


def agreement(model, space, images, labels, n: int, repeats: int) -> dict:
    """Rank agreement of two scorings of one walk step's moves, each on its own n images."""
    moves = [p for _, p in neighbours(Policy.uniform(space, 4), space, paired=False)]
    rhos, same_best = [], []
    for r in range(repeats):
        scores = []
        for half in (2 * r, 2 * r + 1):
            batch = [(images[half * n:(half + 1) * n], labels[half * n:(half + 1) * n])]
            evaluator = PolicyEvaluator(model, batch, None, eval_batches=1, bn_batches=0, bn_mode="batch")
            scores.append([evaluator(p)["loss"] for p in moves])
        rhos.append(float(spearmanr(*scores).statistic))
        same_best.append(min(range(len(moves)), key=scores[0].__getitem__)
                         == min(range(len(moves)), key=scores[1].__getitem__))
    return {"images": n, "moves": len(moves), "spearman (mean)": statistics.mean(rhos), "spearman (min)": min(rhos),
            "same best move": f"{sum(same_best)}/{repeats}", "raw": rhos}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet20")
    p.add_argument("--width", type=float, help="channel width multiplier (resnet20)")
    p.add_argument("--sizes", default="64,128,256,512,1024")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--train-samples", type=int, default=8192)
    p.add_argument("--float-epochs", type=int, default=2)
    p.add_argument("--supernet-epochs", type=int, default=1)
    args = p.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    model, space, val = trained_supernet(args)
    images, labels = (torch.cat(t) for t in zip(*val, strict=True))
    # as many disjoint pairs of sets as the held-out images allow, at most --repeats
    rows = [agreement(model, space, images, labels, n, min(args.repeats, len(labels) // (2 * n))) for n in sizes]
    table = markdown_table(rows, ["images", "moves", "spearman (mean)", "spearman (min)", "same best move"])
    print(f"\n{args.model} (width {args.width or 1}), {args.train_samples} training images, "
          f"{args.supernet_epochs} supernet epoch(s)\n\n{table}")
    write_result("score_stability", {"args": vars(args), "rows": rows, "table": table})


if __name__ == "__main__":
    main()
