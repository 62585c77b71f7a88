"""Accuracy vs BitOPs for every registered search method, from one float checkpoint.

    python benchmarks/pareto.py --preset quick          # 2 CPU cores, well under an hour
    python benchmarks/pareto.py --preset full --device cuda --data-dir DIR

Every method searches at the W2A2-, W3A3- and W4A4-equivalent BitOPs budgets and fine-tunes each
found policy for the same number of epochs through `mixbits search`. Searches that train the weights
(the supernet methods) train for `search_epochs` per budget first; for them the uniform baseline also
runs at their total epochs (`uniform` rows with that `epochs`), so each is compared at equal training.
The retraining-free one-shot search trains one supernet for that same total and tests every budget's
policy on the supernet's weights, without fine-tuning.
Each point records method, budget, seed, epochs, top-1, BitOPs, size, average bits, search and
training seconds and the policy. A new method is one more name in --methods (default: all of
SEARCHERS). Writes
benchmarks/results/pareto-<preset>.json, pareto-<preset>.md and pareto-<preset>.png.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, markdown_table, write_result  # noqa: E402

from mixbits.config import RunConfig  # noqa: E402
from mixbits.runs.search import search  # noqa: E402
from mixbits.runs.train import train  # noqa: E402
from mixbits.search import SEARCHERS  # noqa: E402

CACHE = Path(__file__).parent / "cache"
BUDGETS = "bitops<=uniform:2,uniform:3,uniform:4"

# quick: ResNet-20 at half width on a 10,000-image subset of the Fashion-MNIST training split; the
# test split is always the full 10,000 images. full: the whole data set, full width, for a GPU.
PRESETS = {
    "quick": {"width": 0.5, "train_samples": 10000, "fp_epochs": 8, "finetune_epochs": 3, "search_epochs": 2},
    "full": {"width": 1.0, "train_samples": None, "fp_epochs": 30, "finetune_epochs": 15, "search_epochs": 10},
}
# Methods whose search trains the weights (their `epochs` option): the rest only read the float model.
TRAINING_SEARCHES = {"dnas", "ssps", "dmpq", "sdq"}
# Retraining-free methods: one supernet for search_epochs + finetune_epochs, no fine-tune. The greedy walk
# starts at W5A5 (the authors' code) and scores each neighbour with one forward of 256 validation images
# normalised by their own batch statistics, which keeps it near a minute on 2 CPU cores.
RETRAINING_FREE = {"oneshot": {"start": 5, "eval_batches": 1, "eval_samples": 256, "score_bn": "batch"}}


def base_config(args, preset: dict, out: Path, seed: int) -> RunConfig:
    cfg = RunConfig(out=str(out), device=args.device)
    cfg.model.kwargs = {"width": preset["width"]}
    cfg.data.root = args.data_dir
    cfg.data.max_train_samples = preset["train_samples"]
    cfg.train.seed = seed
    cfg.quant.fused = args.device == "cpu"
    return cfg


def float_checkpoint(args, preset: dict) -> Path:
    """Train (or reuse, or resume) the one float model every method starts from."""
    cfg = base_config(args, preset, CACHE / f"pareto-{args.preset}" / "fp", seed=0)
    cfg.train.epochs, cfg.train.lr, cfg.train.warmup_epochs = preset["fp_epochs"], 0.1, 1.0
    result = train(cfg, resume=(Path(cfg.out) / "checkpoint.pt").exists()).result
    print(f"float: {result['test_top1']:.2f} %", flush=True)
    return Path(cfg.out)


def run_method(args, preset: dict, fp: Path, method: str, seed: int, finetune_epochs: int | None = None,
               options: dict | None = None, tag: str = "") -> list[dict]:
    """One method at every budget; rows carry `epochs`: search plus fine-tune epochs spent after the float model
    (the fine-tune itself starts from the float model, as `mixbits search` does). ``options`` are added to
    the method's options (ablations); ``tag`` names such a variant in the cache and the rows."""
    finetune_epochs = preset["finetune_epochs"] if finetune_epochs is None else finetune_epochs
    search_epochs = preset["search_epochs"] if method in TRAINING_SEARCHES else 0
    method_options = {"epochs": search_epochs} if search_epochs else {}
    if method in RETRAINING_FREE:
        search_epochs, finetune_epochs = preset["search_epochs"] + finetune_epochs, 0
        method_options = {**RETRAINING_FREE[method], "epochs": search_epochs}
    longer = "" if finetune_epochs == preset["finetune_epochs"] or method in RETRAINING_FREE else f"-e{finetune_epochs}"
    out = CACHE / f"pareto-{args.preset}" / f"{method}{tag and '-' + tag}{longer}-s{seed}"
    cfg = base_config(args, preset, out, seed)
    cfg.init = str(fp)
    cfg.search.method, cfg.search.budget = method, BUDGETS
    cfg.search.finetune_epochs = finetune_epochs
    cfg.search.options = {**method_options, **(options or {})}
    cfg.train.lr, cfg.train.weight_decay = 0.01, 1e-4
    rows = search(cfg, resume=(out / "search.json").exists())
    for row in rows:
        row["epochs"] = search_epochs + finetune_epochs
        if tag:
            row["variant"] = tag
        print(f"{method}{tag and ' ' + tag} seed {seed} {row['budget']} ({row['epochs']} epochs): "
              f"{row['test_top1']:.2f} % at {row['bitops'] / 1e9:.4f} G", flush=True)
    return rows


def plot(rows: list[dict], fp_top1: float, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for method in sorted({r["method"] for r in rows}):
        pts = sorted((r["bitops"] / 1e6, r["test_top1"]) for r in rows if r["method"] == method)
        ax.plot(*zip(*pts, strict=True), marker="o", linestyle="", label=method, alpha=0.8)
    ax.axhline(fp_top1, color="gray", linestyle="--", label="float")
    ax.set_xlabel("BitOPs (M)")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title("Accuracy vs BitOPs (Fashion-MNIST, ResNet-20)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    p.add_argument("--methods", nargs="+", default=SEARCHERS.names(), choices=SEARCHERS.names())
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--extra-seeds-for", nargs="*", default=["uniform"],
                   help="methods also run with seed 1 (the baseline and the best method, say)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--data-dir", default=None)
    args = p.parse_args(argv)
    preset = PRESETS[args.preset]
    fp = float_checkpoint(args, preset)
    rows = []
    for method in args.methods:
        seeds = sorted(set(args.seeds) | ({1} if method in args.extra_seeds_for else set()))
        for seed in seeds:
            rows += run_method(args, preset, fp, method, seed)
    if "uniform" in args.methods and (TRAINING_SEARCHES | set(RETRAINING_FREE)) & set(args.methods):
        # uniform at the supernets' total epochs
        rows += run_method(args, preset, fp, "uniform", 0, preset["search_epochs"] + preset["finetune_epochs"])
    fp_top1 = train_result(fp)
    columns = ["method", "budget", "seed", "epochs", "test_top1", "bitops", "size_bytes", "avg_w_bits", "avg_a_bits",
               "search_seconds", "train_seconds"]
    table = markdown_table(rows, columns)
    header = (f"preset {args.preset}: {preset}; float model {fp_top1:.2f} % top-1; "
              f"fine-tune {preset['finetune_epochs']} epochs per policy, after {preset['search_epochs']} search epochs "
              f"per budget for {', '.join(sorted(TRAINING_SEARCHES & set(args.methods))) or 'no method'}")
    print(f"\n{header}\n\n{table}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"pareto-{args.preset}.md").write_text(f"{header}\n\n{table}\n")
    plotted = plot(rows, fp_top1, RESULTS / f"pareto-{args.preset}.png")
    write_result(f"pareto-{args.preset}", {"args": vars(args), "preset": preset, "float_top1": fp_top1,
                                            "rows": rows, "table": table, "plot": plotted})


def train_result(run: Path) -> float:
    import json

    return json.loads((run / "result.json").read_text())["test_top1"]


if __name__ == "__main__":
    main()
