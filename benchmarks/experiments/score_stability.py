"""How many scored images the one-shot walk needs: do two scorings of the same moves rank them the same?

    python benchmarks/experiments/score_stability.py [--model resnet20] [--width 0.5] \
        [--sizes 64,128,256,512,1024] [--repeats 5]

Trains a float model and a one-shot supernet briefly on Fashion-MNIST, then scores the moves of one walk step
(every searchable layer's w or a one candidate up or down from W4A4: 4L neighbours) the way the walk does
(``PolicyEvaluator``, each scored batch normalised by its own statistics) on two disjoint sets of N
validation images, and compares the two rankings: Spearman's ρ over all moves and whether both pick the same
best move. Repeated on up to ``--repeats`` disjoint pairs of sets per N (as many as the held-out split
holds). Writes benchmarks/experiments/results/score_stability.json.

With ``--screen``, what the walk's screened step keeps instead (``screen_samples``, ``screen_keep``): on each of
``--repeats`` disjoint sets of 1024 images, the step's paired moves from W6A6 and from W4A4 are ranked by J (as
the walk does, BitOPs as the cost) on all 1024, and by the screened step (all moves on the first N, the best
``--keep`` share re-scored on all 1024). Reports how often both pick the same move, the full ranking's place of
the screened pick, and its J above the best; and the same for the pick of another 1024 images scoring every move
(the noise of the unscreened walk itself). Writes benchmarks/experiments/results/score_screening.json.

With ``--truth``, which score ranks a step's moves closer to their ranking by cross-entropy on every held-out
image (chunks of 1024, as the walk scores): cross-entropy to the labels, or the KL divergence to the largest
policy's output on the same images (which leaves out how hard each image is, the same for every move), each on
``--repeats`` sets of N images, by Spearman's ρ to that ranking. The sets are drawn from the same held-out
images, so at large N cross-entropy shares data with the ranking it is measured against (KL is helped by
none). Writes benchmarks/experiments/results/score_truth.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/
from common import EXPERIMENT_RESULTS, markdown_table, write_result  # noqa: E402

from mixbits import Policy, SearchSpace  # noqa: E402
from mixbits.budget import parse_budgets  # noqa: E402
from mixbits.cost import profile  # noqa: E402
from mixbits.data import DataConfig, build_loaders  # noqa: E402
from mixbits.models import create  # noqa: E402
from mixbits.quant import quantize_model  # noqa: E402
from mixbits.search import PolicyEvaluator, SearchContext, run_searcher  # noqa: E402
from mixbits.search.greedy import neighbours, objective, step_losses  # noqa: E402
from mixbits.train import TrainConfig, fit  # noqa: E402
from mixbits.utils import seed_everything  # noqa: E402


def trained_supernet(args) -> tuple[SearchContext, object]:
    """A briefly trained float model, then a one-shot supernet trained from it; returns the search context (its
    model is the trained supernet) and the validation data."""
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
    return ctx, val


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


def against_truth(model, space, images, labels, sizes: list[int], repeats: int) -> list[dict]:
    """Spearman ρ of cross-entropy and of KL-to-the-largest-policy scores on N images to the all-images ranking."""
    moves = [p for _, p in neighbours(Policy.uniform(space, 4), space, paired=False)]
    chunks = [(images[i:i + 1024], labels[i:i + 1024]) for i in range(0, len(labels), 1024)]
    everything = PolicyEvaluator(model, chunks, None, eval_batches=len(chunks), bn_batches=0, bn_mode="batch")
    truth = [everything(p)["loss"] for p in moves]
    largest = Policy.from_rules(space, default=(space.w_bits[-1], space.a_bits[-1]))
    rows = []
    for n in sizes:
        rho = {"cross-entropy": [], "KL to largest": []}
        for r in range(min(repeats, len(labels) // n)):
            x, y = images[r * n:(r + 1) * n], labels[r * n:(r + 1) * n]
            labelled = PolicyEvaluator(model, [(x, y)], None, eval_batches=1, bn_batches=0, bn_mode="batch")
            store = {}
            teacher = PolicyEvaluator(model, [(x, y)], None, eval_batches=1, bn_batches=0, bn_mode="batch",
                                      loss_fn=_kl_recording(store))
            teacher(largest)  # records the largest policy's log-probabilities under the same batch statistics
            target = store["log_probs"]
            kl = PolicyEvaluator(model, [(x, y)], None, eval_batches=1, bn_batches=0, bn_mode="batch",
                                 loss_fn=lambda m, batch, t=target: torch.nn.functional.kl_div(
                                     _log_probs(m, batch), t, log_target=True, reduction="batchmean"))
            for name, scorer in (("cross-entropy", labelled), ("KL to largest", kl)):
                rho[name].append(float(spearmanr([scorer(p)["loss"] for p in moves], truth).statistic))
        rows += [{"images": n, "score": name, "sets": len(v), "spearman to all (mean)": statistics.mean(v),
                  "spearman to all (min)": min(v)} for name, v in rho.items()]
    return rows


def _log_probs(model, batch) -> torch.Tensor:
    return torch.log_softmax(model(batch[0]).float(), -1)


def _kl_recording(store: dict):
    """A loss_fn that keeps the model's log-probabilities in ``store`` (the teacher's targets) and scores 0."""

    def loss(model, batch):
        store["log_probs"] = _log_probs(model, batch)
        return torch.zeros(())
    return loss


def screening(ctx, images, labels, n: int, keep: float, repeats: int, lam: float = 1.5) -> list[dict]:
    """Per start policy: does the screened step pick the move that scoring every move on 1024 images picks? As a
    yardstick, the pick of all moves scored on another 1024 images, placed in the same ranking."""
    rows = []
    starts = (("W6A6", Policy.from_rules(ctx.space, default=(6, 6))), ("W4A4", Policy.uniform(ctx.space, 4)))
    for label, start in starts:
        moves = [p for _, p in neighbours(start, ctx.space)]
        costs = [ctx.cost(p)["bitops"] for p in moves]
        sets = [[(images[r * 1024:(r + 1) * 1024], labels[r * 1024:(r + 1) * 1024])] for r in range(repeats)]
        full = [PolicyEvaluator(ctx.model, b, None, eval_batches=1, bn_batches=0, bn_mode="batch") for b in sets]
        j = [objective([f(p)["loss"] for p in moves], costs, lam) for f in full]
        screened, other = [], []
        for r in range(repeats):
            cheap = PolicyEvaluator(ctx.model, sets[r], None, eval_batches=1, bn_batches=0, bn_mode="batch",
                                    eval_samples=n)
            losses, kept = step_losses(moves, costs, full[r], cheap, keep, lam)
            screened_j = objective(losses, costs, lam)
            order = sorted(range(len(moves)), key=j[r].__getitem__)
            for pick, out in ((min(kept, key=screened_j.__getitem__), screened),
                              (min(range(len(moves)), key=j[(r + 1) % repeats].__getitem__), other)):
                out.append((pick == order[0], order.index(pick) + 1, j[r][pick] - j[r][order[0]]))
        row = {"start": label, "moves": len(moves), "screen images": n, "keep": keep, "rescored": len(kept)}
        for name, picks in (("screened", screened), ("other 1024", other)):
            row[f"{name}: same pick"] = f"{sum(p[0] for p in picks)}/{repeats}"
            row[f"{name}: place (mean)"] = statistics.mean(p[1] for p in picks)
            row[f"{name}: J above best (mean)"] = statistics.mean(p[2] for p in picks)
        rows.append(row)
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet20")
    p.add_argument("--width", type=float, help="channel width multiplier (resnet20)")
    p.add_argument("--sizes", default="64,128,256,512,1024")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--train-samples", type=int, default=8192)
    p.add_argument("--float-epochs", type=int, default=2)
    p.add_argument("--supernet-epochs", type=int, default=1)
    p.add_argument("--screen", action="store_true", help="measure the walk's screened step instead")
    p.add_argument("--keep", type=float, default=0.15, help="with --screen: the share of moves re-scored")
    p.add_argument("--truth", action="store_true",
                   help="rank moves by cross-entropy and by KL to the largest policy against all held-out images")
    args = p.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    ctx, val = trained_supernet(args)
    model, space = ctx.model, ctx.space
    images, labels = (torch.cat(t) for t in zip(*val, strict=True))
    if args.truth:
        rows = against_truth(model, space, images, labels, sizes, args.repeats)
        table = markdown_table(rows, ["images", "score", "sets", "spearman to all (mean)", "spearman to all (min)"])
        print(f"\n{args.model} (width {args.width or 1}), {args.train_samples} training images, "
              f"{args.supernet_epochs} supernet epoch(s), {len(labels)} held-out images\n\n{table}")
        write_result("score_truth", {"args": vars(args), "rows": rows, "table": table}, directory=EXPERIMENT_RESULTS)
        return
    if args.screen:
        repeats = min(args.repeats, len(labels) // 1024)
        rows = [row for n in sizes if n < 1024 for row in screening(ctx, images, labels, n, args.keep, repeats)]
        columns = ["start", "moves", "screen images", "rescored"] + [
            f"{name}: {what}" for name in ("screened", "other 1024") for what in ("same pick", "place (mean)",
                                                                                 "J above best (mean)")]
        table = markdown_table(rows, columns)
        print(f"\n{args.model} (width {args.width or 1}), {args.train_samples} training images, "
              f"{args.supernet_epochs} supernet epoch(s)\n\n{table}")
        write_result("score_screening", {"args": vars(args), "rows": rows, "table": table},
                     directory=EXPERIMENT_RESULTS)
        return
    # as many disjoint pairs of sets as the held-out images allow, at most --repeats
    rows = [agreement(model, space, images, labels, n, min(args.repeats, len(labels) // (2 * n))) for n in sizes]
    table = markdown_table(rows, ["images", "moves", "spearman (mean)", "spearman (min)", "same best move"])
    print(f"\n{args.model} (width {args.width or 1}), {args.train_samples} training images, "
          f"{args.supernet_epochs} supernet epoch(s)\n\n{table}")
    write_result("score_stability", {"args": vars(args), "rows": rows, "table": table}, directory=EXPERIMENT_RESULTS)


if __name__ == "__main__":
    main()
