"""`mixbits demo`: the embedded default end to end, under 10 minutes on 2 CPU cores (setup included).

Fashion-MNIST (the real files from the Debian package), ResNet-20, at a budget between two uniform
levels (default `bitops<=uniform:2.5`, between W2A2 and W3A3): a short float training; the best uniform
policy that fits that budget (W2A2), trained by quantization-aware training from the float model; and a
mixed policy found by a search (default HAWQ) at the same budget, fine-tuned with the same recipe. It
prints the cost table of the mixed policy and the two side by side. Run it again and finished stages
are reused; an interrupted training stage resumes from its last checkpoint.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from ..config import RunConfig
from ..cost import cost_summary, cost_table, format_cost_table, profile
from ..errors import MixbitsError
from ..pipeline import load_trained
from ..runs.search import search
from ..runs.train import train


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/demo", help="directory for the demo's runs (default: runs/demo)")
    # 2.5: where uniform W2A2 is the only uniform policy that fits and loses most (benchmarks/front.py)
    p.add_argument("--bits", type=float, default=2.5,
                   help="the budget, as uniform bits: bitops<=uniform:BITS (default: 2.5, between W2A2 and W3A3)")
    p.add_argument("--method", default="hawq", help="search method for the mixed policy (default: hawq)")
    p.add_argument("--fp-epochs", type=int, default=3)
    p.add_argument("--qat-epochs", type=int, default=2, help="QAT epochs of the uniform and of the mixed policy")
    p.add_argument("--train-samples", type=int, default=10000, help="training images used (default: 10000)")
    p.add_argument("--data-dir", help="Fashion-MNIST directory (default: the Debian package's)")


def stage_configs(args) -> tuple[RunConfig, RunConfig, RunConfig]:
    """The float, uniform and mixed stages, as plain run configs (what `mixbits train`/`search` would be given)."""
    out = Path(args.out)
    fp = RunConfig(out=str(out / "fp"))
    fp.data.root = args.data_dir
    fp.data.max_train_samples = args.train_samples
    fp.train.epochs, fp.train.lr, fp.train.warmup_epochs = args.fp_epochs, 0.1, min(1.0, args.fp_epochs)
    uniform_bits = math.floor(args.bits)  # the highest uniform level within the budget
    qat = RunConfig(out=str(out / f"w{uniform_bits}a{uniform_bits}"), init=str(out / "fp"))
    qat.data = fp.data
    qat.quant.policy = f"uniform:{uniform_bits}"
    qat.train.epochs, qat.train.lr, qat.train.weight_decay = args.qat_epochs, 0.01, 1e-4
    mixed = RunConfig(out=str(out / f"{args.method}-uniform{args.bits:g}"), init=str(out / "fp"))
    mixed.data, mixed.train = fp.data, qat.train
    mixed.search.method, mixed.search.budget = args.method, f"bitops<=uniform:{args.bits:g}"
    mixed.search.finetune_epochs = args.qat_epochs
    return fp, qat, mixed


def run(args) -> int:
    if not 2 <= args.bits <= 8:
        raise MixbitsError(f"--bits {args.bits:g} is outside 2..8; e.g. --bits 2.5 (between W2A2 and W3A3)")
    fp, qat, mixed = stage_configs(args)
    results = {}
    for name, cfg in (("float", fp), (f"uniform {qat.quant.policy[8:]}-bit (fits)", qat)):
        print(f"== {name}: {cfg.train.epochs} epochs on {cfg.data.max_train_samples} Fashion-MNIST images -> {cfg.out}")
        resume = (Path(cfg.out) / "checkpoint.pt").exists()
        results[name] = train(cfg, resume=resume).result
    print(f"\n== {args.method} search at {mixed.search.budget}, then {args.qat_epochs} epochs of the same QAT -> "
          f"{mixed.out}")
    finished = Path(mixed.out) / "result.json"
    rows = json.loads(finished.read_text()) if finished.is_file() else search(mixed, resume=Path(mixed.out).is_dir())
    results[f"mixed ({args.method})"] = rows[0]
    _, card, _ = load_trained(Path(mixed.out) / "finetune" / "budget0")
    stats = profile(card.float_model(), card.example_input())
    print("\n== cost of the mixed policy (first and last layer at 8 bits)")
    print(format_cost_table(cost_table(stats, card.policy), totals=cost_summary(stats, card.policy)))
    print(f"\n== at {mixed.search.budget} (test split, 10,000 images)")
    for name, r in results.items():
        extra = f"  BitOPs {r['bitops'] / 1e9:.4f} G, {r['size_bytes'] / 1e3:.1f} KB" if "bitops" in r else ""
        print(f"  {name:<26} top-1 {r['test_top1']:.2f} %{extra}")
    uniform, found = list(results.values())[1:]
    gain = found["test_top1"] - uniform["test_top1"]
    print(f"\n  the mixed policy {'beats' if gain > 0 else 'does not beat'} the uniform one by {gain:+.2f} pt, "
          f"within the same budget")
    return 0
