"""Sizing the front's one fine-tune recipe: how far the uniform references spread over seeds, per recipe.

    python benchmarks/experiments/recipe.py --model resnet20 --recipes e2-lsq e6-fitted-kd
    python benchmarks/experiments/recipe.py --model mobilenetv2 --report-only

The front (benchmarks/front.py) fine-tunes every policy, references and searches alike, with one recipe. A recipe
that has not converged lets one policy's top-1 move by points between seeds, which no search gain survives. This
fine-tunes the uniform references W2A2, W3A3 and W4A4 from the medium preset's float model (the front's, in
benchmarks/front-state/<model>-medium/float.pt) at seeds 0-2 with each recipe, on the front's data (8,000 training
images per seed, the one validation split of seed 0, the whole test split), and reports top-1 mean and standard
deviation over seeds. Recipes (SGD at mixbits.FINETUNE_LR, cosine, weight decay 1e-4, the model's gradient clip):

- ``e2-lsq``: the recipe of the fronts before: 2 epochs from LSQ's initial steps, no distillation.
- ``e<N>-fitted-kd``: N epochs from fitted steps, distilled from the float model (kd_alpha 0.5).

With ``--oneshot``, the other measurement the recipe is sized by: the one-shot search at two in-between budgets
(ONESHOT_BUDGETS), once per seed, scored retraining-free (its policies on the supernet's weights) and each policy
fine-tuned from the float model with each recipe; a recipe that leaves the fine-tuned policy below the same
policy without fine-tuning has not converged.

Every finished fine-tune is one line of benchmarks/experiments/state/recipe-<model>.jsonl (with the commit that
made it), so the script resumes where it stopped; interrupted fine-tunes resume from their checkpoints. Writes
benchmarks/experiments/results/recipe-<model>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from common import markdown_table, metadata  # noqa: E402
from front import Bench  # noqa: E402

import mixbits  # noqa: E402

REFERENCES = ("uniform:2", "uniform:3", "uniform:4")
ONESHOT_BUDGETS = ("bitops<=uniform:2.5", "bitops<=uniform:3.5")
STATE = HERE / "state"
RESULTS = HERE / "results"


def recipe_settings(label: str) -> tuple[int, dict]:
    """(epochs, fine-tune settings) of a recipe label: ``e2-lsq`` or ``e<N>-fitted-kd``."""
    if label == "e2-lsq":
        return 2, {"init": "lsq", "kd_alpha": 0.0}
    match = re.fullmatch(r"e(\d+)-fitted-kd", label)
    if not match:
        raise SystemExit(f"unknown recipe {label!r}; expected e2-lsq or e<N>-fitted-kd (e.g. e6-fitted-kd)")
    return int(match.group(1)), {"init": "fitted", "kd_alpha": 0.5}


class Rows:
    """state/recipe-<model>.jsonl: one finished fine-tune per line, keyed by (recipe, policy, seed)."""

    def __init__(self, model: str):
        self.path = STATE / f"recipe-{model}.jsonl"
        lines = self.path.read_text().splitlines() if self.path.is_file() else []
        self.rows = {r["key"]: r for r in map(json.loads, lines)}

    def put(self, row: dict) -> None:
        self.rows[row["key"]] = row
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("".join(json.dumps(r) + "\n" for r in self.rows.values()))


def finetuned_fields(bench: Bench, label: str, policy, seed: int, name: str) -> dict:
    """``policy`` fine-tuned from the float model with recipe ``label``: its row's fields (top-1 None: diverged)."""
    epochs, settings = recipe_settings(label)
    bench.preset["finetune_epochs"] = epochs
    bench.recipe = {**bench.recipe, **settings}
    model, seconds = bench.finetuned(policy, None, seed, name)
    top1 = None if model is None else bench.test(model, bench.loaders(seed)[2])
    return {"test_top1": top1, "epochs": epochs, **settings, **seconds, "commit": metadata()["commit"]}


def run(bench: Bench, rows: Rows, recipes: list[str], seeds: list[int]) -> None:
    for label in recipes:
        for seed in seeds:
            for policy in REFERENCES:
                key = f"{label}|{policy}|{seed}"
                if key in rows.rows:
                    continue
                fields = finetuned_fields(bench, label, policy, seed, f"recipe-{label}-{policy[8:]}-s{seed}")
                rows.put({"key": key, "recipe": label, "policy": policy, "seed": seed, **fields})
                print(f"{label:>14} {policy:<10} seed {seed}: {fields['test_top1']} % "
                      f"({fields['finetune_seconds']:.0f} s)", flush=True)


def oneshot(bench: Bench, rows: Rows, recipes: list[str], seeds: list[int]) -> None:
    """One-shot at ONESHOT_BUDGETS per seed: retraining-free top-1, then each policy fine-tuned with each recipe."""
    budgets = list(ONESHOT_BUDGETS)
    for seed in seeds:
        keys = [f"oneshot-free|{b}|{seed}" for b in budgets]
        if not all(k in rows.rows for k in keys):
            result, compute = bench.search("oneshot", budgets, seed, {"random_baseline": False})
            for i, (budget, policy) in enumerate(zip(budgets, result.policies, strict=True)):
                net = mixbits.subnet(result, i, bn_data=bench.loaders(seed)[0], device=bench.device)
                rows.put({"key": keys[i], "recipe": "oneshot-free", "policy": budget, "seed": seed,
                          "test_top1": bench.test(net, bench.loaders(seed)[2]), "bits": policy.to_dict(),
                          **compute, "commit": metadata()["commit"]})
        for label in recipes:
            for i, budget in enumerate(budgets):
                key = f"oneshot-{label}|{budget}|{seed}"
                if key in rows.rows:
                    continue
                policy = mixbits.Policy.from_dict(rows.rows[keys[i]]["bits"])
                fields = finetuned_fields(bench, label, policy, seed, f"recipe-oneshot-{label}-b{i}-s{seed}")
                rows.put({"key": key, "recipe": f"oneshot-{label}", "policy": budget, "seed": seed, **fields})
                print(f"oneshot {label:>14} {budget} seed {seed}: {fields['test_top1']} % "
                      f"(retraining-free {rows.rows[keys[i]]['test_top1']} %)", flush=True)


def oneshot_gaps(rows: Rows) -> list[dict]:
    """Per recipe: fine-tuned minus retraining-free top-1 of the same one-shot policy, per budget and seed."""
    free = {(r["policy"], r["seed"]): r["test_top1"] for r in rows.rows.values() if r["recipe"] == "oneshot-free"}
    by_recipe: dict[str, list[float]] = {}
    for r in rows.rows.values():
        if r["recipe"].startswith("oneshot-e") and r["test_top1"] is not None:
            by_recipe.setdefault(r["recipe"][8:], []).append(r["test_top1"] - free[r["policy"], r["seed"]])
    return [{"recipe": label, "n": len(gaps), "gaps": " / ".join(f"{g:+.2f}" for g in gaps),
             "mean_gap": statistics.fmean(gaps), "min_gap": min(gaps)}
            for label, gaps in sorted(by_recipe.items(), key=lambda kv: recipe_settings(kv[0])[0])]


def summary(rows: Rows) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for r in rows.rows.values():
        if r["recipe"].startswith("oneshot"):
            continue
        groups.setdefault((r["recipe"], r["policy"]), []).append(r)
    out = []
    for (label, policy), group in sorted(groups.items(), key=lambda kv: (recipe_settings(kv[0][0])[0], kv[0])):
        top1 = [r["test_top1"] for r in sorted(group, key=lambda r: r["seed"]) if r["test_top1"] is not None]
        out.append({"recipe": label, "policy": policy, "n": len(group), "diverged": len(group) - len(top1),
                    "top1_by_seed": " / ".join(f"{t:.2f}" for t in top1),
                    "mean": statistics.fmean(top1) if top1 else None,
                    "std": statistics.stdev(top1) if len(top1) > 1 else None,
                    "finetune_seconds": statistics.fmean(r["finetune_seconds"] for r in group)})
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=("resnet20", "mobilenetv2"), default="resnet20")
    p.add_argument("--recipes", nargs="+", default=["e6-fitted-kd", "e2-lsq"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--oneshot", action="store_true",
                   help="also compare each recipe's fine-tune of one-shot policies with their retraining-free top-1")
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args(argv)
    for label in args.recipes:
        recipe_settings(label)  # an unknown label fails before any work
    rows = Rows(args.model)
    bench = Bench(argparse.Namespace(model=args.model, preset="medium", seeds=args.seeds, device="cpu",
                                     data_dir=None, state_dir=str(HERE.parent / "front-state"), keep_stale=False))
    if not args.report_only:
        run(bench, rows, args.recipes, args.seeds)
        if args.oneshot:
            oneshot(bench, rows, args.recipes, args.seeds)
    table = summary(rows)
    header = (f"{args.model}, medium preset's float model ({bench.float_top1:.2f} % test top-1), 8,000 training "
              "images a seed, the validation split of seed 0, test top-1 on 10,000 images; standard deviation over "
              "seeds (sample).")
    RESULTS.mkdir(parents=True, exist_ok=True)
    markdown = markdown_table(table, ["recipe", "policy", "n", "diverged", "top1_by_seed", "mean", "std",
                                      "finetune_seconds"])
    gaps = oneshot_gaps(rows)
    if gaps:
        markdown += ("\n\nOne-shot policies at " + ", ".join(ONESHOT_BUDGETS) + ": fine-tuned from the float model by "
                     "each recipe minus retraining-free (the same policy on the supernet's weights), per budget and "
                     "seed, in points of test top-1.\n\n"
                     + markdown_table(gaps, ["recipe", "n", "gaps", "mean_gap", "min_gap"]))
    (RESULTS / f"recipe-{args.model}.md").write_text(f"{header}\n\n{markdown}\n")
    (RESULTS / f"recipe-{args.model}.json").write_text(
        json.dumps({"meta": metadata(), "rows": list(rows.rows.values()), "summary": table, "oneshot": gaps},
                   indent=1) + "\n")
    print(f"\n{header}\n\n{markdown}")


if __name__ == "__main__":
    main()
