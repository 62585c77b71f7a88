"""Time of the one-shot greedy walks for every budget of a finished one-shot run, on its saved supernet.

    mixbits search --method oneshot --init runs/fp --budget "bitops<=uniform:2.5,uniform:3.5" --out runs/oneshot
    python benchmarks/greedy.py --run runs/oneshot

Re-runs only the inference part of ``--method oneshot`` (the supernet is loaded, not trained) with the
run's own options, once with prefix reuse (the default) and once without, in one process, and checks
that both return the run's policies. Writes benchmarks/results/greedy.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import markdown_table, write_result  # noqa: E402

from mixbits.budget import parse_budgets  # noqa: E402
from mixbits.config import load_config  # noqa: E402
from mixbits.cost import profile  # noqa: E402
from mixbits.data import build_loaders  # noqa: E402
from mixbits.pipeline import float_card  # noqa: E402
from mixbits.runs.subnets import load_supernet  # noqa: E402
from mixbits.search import SearchContext, run_searcher  # noqa: E402
from mixbits.space import Policy  # noqa: E402
from mixbits.utils import seed_everything  # noqa: E402


def walk(run: Path, reuse_prefix: bool) -> dict:
    """The run's walks on its supernet; seconds of the walks alone and the policies they return."""
    cfg = load_config(run / "config.yaml")
    seed_everything(cfg.train.seed)
    train_loader, val_loader, _, train_set = build_loaders(cfg.data, cfg.train.seed)
    card = float_card(cfg.model, train_set.num_classes, train_set.in_chans, train_set.image_size)
    model, space = load_supernet(run / "oneshot_supernet.pt", card, cfg.quant.per_channel)
    options = {**cfg.search.options, "epochs": 0, "save_supernet": False, "reuse_prefix": reuse_prefix}
    ctx = SearchContext(model=model.eval(), space=space, stats=profile(card.float_model(), card.input_shape),
                        budgets=parse_budgets(cfg.search.budget), train_loader=train_loader,
                        val_loader=val_loader, options=options, progress=False)
    began = time.perf_counter()
    result = run_searcher("oneshot", ctx)
    seconds = time.perf_counter() - began
    walks = [t for t in result.trace if t["stage"] == "greedy"]
    return {"reuse_prefix": reuse_prefix, "seconds": seconds, "evaluations": result.info["evaluations"],
            "ms per evaluation": 1000 * seconds / max(1, result.info["evaluations"]),
            "steps": sum(len(w["steps"]) for w in walks if w["continued_from"] is None),
            "policies": [p.describe() for p in result.policies]}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, required=True, help="a finished `mixbits search --method oneshot` run")
    args = p.parse_args(argv)
    if not (args.run / "oneshot_supernet.pt").is_file():
        sys.exit(f"{args.run} holds no oneshot_supernet.pt: run `mixbits search --method oneshot --out DIR` first")
    saved = [Policy.load(path).describe() for path in sorted((args.run / "policies").glob("budget*.json"))]
    rows = [walk(args.run, reuse) for reuse in (True, False)]
    for row in rows:
        row["same policies as the run"] = row["policies"] == saved
    table = markdown_table(rows, ["reuse_prefix", "seconds", "evaluations", "ms per evaluation", "steps",
                                  "same policies as the run"])
    print(f"\n{args.run.name}: greedy walks for {load_config(args.run / 'config.yaml').search.budget}, "
          f"{torch.get_num_threads()} threads\n\n{table}")
    write_result("greedy", {"run": str(args.run), "rows": rows, "table": table})


if __name__ == "__main__":
    main()
