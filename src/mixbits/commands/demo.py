"""`mixbits demo`: the embedded default end to end, in a few minutes on 2 CPU cores.

Fashion-MNIST (the real files from the Debian package), ResNet-20: a short float training, a short
uniform quantization-aware training from it, the cost table of the quantized model, and a small
one-shot mixed-precision search at the same BitOPs whose policy is tested without retraining. Run it
again and finished stages are reused; an interrupted training stage resumes from its last checkpoint.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..config import RunConfig
from ..cost import cost_summary, cost_table, format_cost_table, profile
from ..pipeline import load_trained
from ..runs.search import search
from ..runs.train import train


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/demo", help="directory for the demo's runs (default: runs/demo)")
    p.add_argument("--bits", type=int, default=4, help="uniform bit-width of the quantized model (default: 4)")
    p.add_argument("--fp-epochs", type=int, default=3)
    p.add_argument("--qat-epochs", type=int, default=2)
    p.add_argument("--oneshot-epochs", type=int, default=1,
                   help="supernet epochs of the one-shot search at the W{bits}A{bits} BitOPs (default: 1; 0 skips it)")
    p.add_argument("--train-samples", type=int, default=12000, help="training images used (default: 12000)")
    p.add_argument("--data-dir", help="Fashion-MNIST directory (default: the Debian package's)")


def stage_configs(args) -> tuple[RunConfig, RunConfig]:
    """The float and the quantized stage, as plain run configs (what `mixbits train` would be given)."""
    out = Path(args.out)
    fp = RunConfig(out=str(out / "fp"))
    fp.data.root = args.data_dir
    fp.data.max_train_samples = args.train_samples
    fp.train.epochs, fp.train.lr, fp.train.warmup_epochs = args.fp_epochs, 0.1, min(1.0, args.fp_epochs)
    qat = RunConfig(out=str(out / f"w{args.bits}a{args.bits}"), init=str(out / "fp"))
    qat.data = fp.data
    qat.quant.policy = f"uniform:{args.bits}"
    qat.train.epochs, qat.train.lr, qat.train.weight_decay = args.qat_epochs, 0.01, 1e-4
    return fp, qat


def oneshot_config(args) -> RunConfig:
    """The one-shot stage: a supernet from the float model, one greedy walk to the W{bits}A{bits} BitOPs."""
    out = Path(args.out)
    cfg = RunConfig(out=str(out / f"oneshot-w{args.bits}a{args.bits}"), init=str(out / "fp"))
    cfg.data.root, cfg.data.max_train_samples = args.data_dir, args.train_samples
    cfg.search.method, cfg.search.budget, cfg.search.finetune_epochs = "oneshot", f"bitops<=uniform:{args.bits}", 0
    # start one bit above the budget and score 128 images, so the walk stays short on a CPU
    start = min(args.bits + 1, max(cfg.quant.w_bits))
    cfg.search.options = {"epochs": args.oneshot_epochs, "start": start, "eval_samples": 128}
    return cfg


def run(args) -> int:
    fp, qat = stage_configs(args)
    results = {}
    for name, cfg in (("float", fp), (f"W{args.bits}A{args.bits}", qat)):
        print(f"== {name}: {cfg.train.epochs} epochs on {cfg.data.max_train_samples} Fashion-MNIST images -> {cfg.out}")
        resume = (Path(cfg.out) / "checkpoint.pt").exists()
        results[name] = train(cfg, resume=resume).result
    _, card, _ = load_trained(qat.out)
    stats = profile(card.float_model(), card.input_shape)
    print(f"\n== cost of {card.name} at W{args.bits}A{args.bits} (first and last layer at 8 bits)")
    print(format_cost_table(cost_table(stats, card.policy), totals=cost_summary(stats, card.policy)))
    if args.oneshot_epochs > 0:
        results.update(_oneshot_stage(args))
    print("\n== summary (test split, 10,000 images)")
    for name, r in results.items():
        extra = f"  BitOPs {r['bitops'] / 1e9:.3f} G, {r['size_bytes'] / 1e3:.1f} KB" if "bitops" in r else ""
        print(f"  {name:<22} top-1 {r['test_top1']:.2f} %{extra}")
        if "avg_w_bits" in r:
            print(f"  {'':<22} average bits w {r['avg_w_bits']:.2f} / a {r['avg_a_bits']:.2f}: {r['policy']}")
    return 0


def _oneshot_stage(args) -> dict:
    cfg = oneshot_config(args)
    print(f"\n== one-shot search: {args.oneshot_epochs} supernet epoch(s), then a greedy walk to "
          f"{cfg.search.budget} -> {cfg.out}")
    finished = Path(cfg.out) / "result.json"
    if finished.is_file():
        rows = json.loads(finished.read_text())
    else:  # an interrupted search continues from its last supernet checkpoint
        rows = search(cfg, resume=Path(cfg.out).is_dir())
    return {"one-shot (no retrain)": rows[0]}
