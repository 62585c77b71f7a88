"""`mixbits demo`: the embedded default end to end, in a few minutes on 2 CPU cores.

Fashion-MNIST (the real files from the Debian package), ResNet-20, at a budget between two uniform levels
(default `bitops<=uniform:2.25`, a quarter of the way from W2A2 to W3A3): a short float training; every
uniform-like policy a user would try first that fits the budget (W{w}A{a} with the most bits for each weight
bit-width, e.g. W2A2 at 2.25, w2a3 and w3a2 at 2.5), each fine-tuned from the float model; and a mixed policy
found by a search (default HAWQ) at the same budget, fine-tuned with the same recipe (from fitted steps,
distilled from the float model). It prints the cost table of the mixed policy, every policy's test top-1 side
by side, and the mixed policy's margin over the best uniform-like one. Run it again and finished stages are
reused; an interrupted training stage resumes from its last checkpoint.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
from pathlib import Path

from ..config import RunConfig
from ..cost import cost_summary, cost_table, format_cost_table, profile
from ..errors import MixbitsError
from ..pipeline import load_trained
from ..runs.search import search
from ..runs.train import train

BIT_RANGE = range(2, 9)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/demo", help="directory for the demo's runs (default: runs/demo)")
    p.add_argument("--bits", type=float, default=2.25,
                   help="the budget, as uniform bits: bitops<=uniform:BITS (default: 2.25, between W2A2 and W3A3)")
    p.add_argument("--method", default="hawq", help="search method for the mixed policy (default: hawq)")
    p.add_argument("--seed", type=int, default=0, help="seed of every stage: data split and order, init (default: 0)")
    p.add_argument("--fp-epochs", type=int, default=3)
    p.add_argument("--qat-epochs", type=int, default=3,
                   help="fine-tune epochs of every quantized policy, uniform-like and mixed (default: 3)")
    p.add_argument("--train-samples", type=int, default=10000, help="training images used (default: 10000)")
    p.add_argument("--data-dir", help="Fashion-MNIST directory (default: the Debian package's)")


def uniform_like(bits: float) -> list[tuple[int, int]]:
    """The uniform-like policies W{w}A{a} that fit ``bitops<=uniform:bits`` and that no other fitting one beats in
    both bit-widths. Every searchable layer's BitOPs are MACs x w x a, so W{w}A{a} fits exactly when w·a <= bits²."""
    fitting = [(w, max(a for a in BIT_RANGE if w * a <= bits * bits + 1e-9)) for w in BIT_RANGE if 2 * w <= bits ** 2]
    return [(w, a) for w, a in fitting if not any(w2 >= w and a2 >= a and (w2, a2) != (w, a) for w2, a2 in fitting)]


def stage_configs(args) -> tuple[RunConfig, list[RunConfig], RunConfig]:
    """The float, uniform-like and mixed stages, as plain run configs (what `mixbits train`/`search` would be given)."""
    out = Path(args.out)
    fp = RunConfig(out=str(out / "fp"))
    fp.data.root = args.data_dir
    fp.data.max_train_samples = args.train_samples
    fp.train.seed = args.seed
    fp.train.epochs, fp.train.lr, fp.train.warmup_epochs = args.fp_epochs, 0.1, min(1.0, args.fp_epochs)
    recipe = copy.deepcopy(fp.train)  # the fine-tune of every quantized policy
    recipe.epochs, recipe.lr, recipe.weight_decay, recipe.warmup_epochs = args.qat_epochs, 0.01, 1e-4, 0.0
    recipe.kd_alpha = 0.5  # distilled from the float model (the --init run)
    references = []
    for w, a in uniform_like(args.bits):
        qat = RunConfig(out=str(out / f"w{w}a{a}"), init=str(out / "fp"))
        qat.data, qat.train = fp.data, recipe
        qat.quant.policy = f"uniform:w{w}a{a}"
        references.append(qat)
    mixed = RunConfig(out=str(out / f"{args.method}-uniform{args.bits:g}"), init=str(out / "fp"))
    mixed.data, mixed.train = fp.data, recipe
    mixed.search.method, mixed.search.budget = args.method, f"bitops<=uniform:{args.bits:g}"
    mixed.search.finetune_epochs = args.qat_epochs
    return fp, references, mixed


def run(args) -> int:
    if not 2 <= args.bits <= 8 or not math.isfinite(args.bits):
        raise MixbitsError(f"--bits {args.bits:g} is outside 2..8; e.g. --bits 2.25 (between W2A2 and W3A3)")
    fp, references, mixed = stage_configs(args)
    results = {}
    for name, cfg in (("float", fp), *((f"uniform-like {cfg.quant.policy[8:].upper()}", cfg) for cfg in references)):
        print(f"== {name}: {cfg.train.epochs} epochs on {cfg.data.max_train_samples} Fashion-MNIST images -> {cfg.out}")
        resume = (Path(cfg.out) / "checkpoint.pt").exists()
        results[name] = train(cfg, resume=resume).result
    print(f"\n== {args.method} search at {mixed.search.budget}, then {args.qat_epochs} epochs of the same fine-tune -> "
          f"{mixed.out}")
    finished = Path(mixed.out) / "result.json"
    rows = json.loads(finished.read_text()) if finished.is_file() else search(mixed, resume=Path(mixed.out).is_dir())
    results[f"mixed ({args.method})"] = rows[0]
    _, card, _ = load_trained(Path(mixed.out) / "finetune" / "budget0")
    stats = profile(card.float_model(), card.example_input())
    print("\n== cost of the mixed policy (first and last layer at 8 bits)")
    print(format_cost_table(cost_table(stats, card.policy), totals=cost_summary(stats, card.policy)))
    print(f"\n== at {mixed.search.budget}, seed {args.seed} (test split, 10,000 images)")
    for name, r in results.items():
        extra = f"  BitOPs {r['bitops'] / 1e9:.4f} G, {r['size_bytes'] / 1e3:.1f} KB" if "bitops" in r else ""
        print(f"  {name:<26} top-1 {r['test_top1']:.2f} %{extra}")
    best_name, best = max(((n, r) for n, r in results.items() if n.startswith("uniform-like")),
                          key=lambda item: item[1]["test_top1"])
    gain = results[f"mixed ({args.method})"]["test_top1"] - best["test_top1"]
    verdict = "beats" if gain > 0 else "does not beat"
    print(f"\n  the mixed policy {verdict} the best uniform-like policy that fits ({best_name[13:]}) by "
          f"{gain:+.2f} pt, within the same budget")
    summary = {"seed": args.seed, "budget": mixed.search.budget, "method": args.method, "gain": gain,
               "best_uniform_like": best_name[13:], "top1": {n: r["test_top1"] for n, r in results.items()}}
    (Path(args.out) / "demo.json").write_text(json.dumps(summary, indent=2) + "\n")
    return 0
