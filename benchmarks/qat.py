"""Uniform QAT from one float checkpoint: accuracy at W8A8, W4A4, W2A2 next to the float model.

    python benchmarks/qat.py [--fp-epochs 10] [--qat-epochs 3] [--bits 8 4 2] [--seeds 0 1]
                             [--train-samples N] [--model resnet20] [--data-dir DIR]

The float model is trained once and cached under benchmarks/cache/ (resumed if interrupted); each
QAT run starts from it through `mixbits train` itself. Writes benchmarks/results/qat.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import markdown_table, write_result  # noqa: E402

from mixbits.config import RunConfig  # noqa: E402
from mixbits.runs.train import train  # noqa: E402

CACHE = Path(__file__).parent / "cache"


def run_config(args, out: Path, seed: int) -> RunConfig:
    cfg = RunConfig(out=str(out))
    cfg.model.name = args.model
    cfg.data.root = args.data_dir
    cfg.data.max_train_samples = args.train_samples
    cfg.train.seed = seed
    return cfg


def train_cached(cfg: RunConfig) -> tuple[dict, float]:
    """The run's result and its training seconds (every epoch's, however often it was resumed)."""
    result = train(cfg, resume=(Path(cfg.out) / "checkpoint.pt").exists()).result
    return result, result["train_seconds"]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet20")
    p.add_argument("--fp-epochs", type=int, default=10)
    p.add_argument("--qat-epochs", type=int, default=3)
    p.add_argument("--bits", type=int, nargs="+", default=[8, 4, 2])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--train-samples", type=int, default=None, help="training images (default: all 54,000)")
    p.add_argument("--data-dir", default=None)
    args = p.parse_args(argv)
    tag = f"{args.model}-fp{args.fp_epochs}-n{args.train_samples or 'all'}"

    fp = run_config(args, CACHE / tag / "fp", seed=0)
    fp.train.epochs, fp.train.lr, fp.train.warmup_epochs = args.fp_epochs, 0.1, 1.0
    fp_result, fp_seconds = train_cached(fp)
    rows = [{"policy": "float", "seed": 0, "epochs": args.fp_epochs, "top1": fp_result["test_top1"],
             "delta vs float": 0.0, "seconds": fp_seconds}]
    print(f"float: {fp_result['test_top1']:.2f} %", flush=True)
    for bits in args.bits:
        for seed in args.seeds:
            cfg = run_config(args, CACHE / tag / f"w{bits}a{bits}-e{args.qat_epochs}-s{seed}", seed)
            cfg.init = fp.out
            cfg.quant.policy = f"uniform:{bits}"
            cfg.train.epochs, cfg.train.lr, cfg.train.weight_decay = args.qat_epochs, 0.01, 1e-4
            result, seconds = train_cached(cfg)
            rows.append({"policy": f"W{bits}A{bits}", "seed": seed, "epochs": args.qat_epochs,
                         "top1": result["test_top1"], "delta vs float": result["test_top1"] - fp_result["test_top1"],
                         "bitops (G)": result["bitops"] / 1e9, "size (KB)": result["size_bytes"] / 1e3,
                         "seconds": seconds})
            print(f"W{bits}A{bits} seed {seed}: {result['test_top1']:.2f} %", flush=True)
    table = markdown_table(rows, ["policy", "seed", "epochs", "top1", "delta vs float", "bitops (G)", "size (KB)",
                                  "seconds"])
    print(f"\n{args.model} on Fashion-MNIST test (10,000 images); float {args.fp_epochs} epochs lr 0.1, "
          f"QAT {args.qat_epochs} epochs lr 0.01 from it\n\n{table}")
    write_result("qat", {"args": vars(args), "rows": rows, "table": table})


if __name__ == "__main__":
    main()
