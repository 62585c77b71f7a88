"""`mixbits eval RUN`: top-1 and loss of a trained run (float or quantized) on the test split.

    mixbits eval runs/w4a4 [--data-dir DIR] [--split test|val]
"""

from __future__ import annotations

import argparse
import json

from ..data import build_loaders
from ..errors import MixbitsError
from ..pipeline import load_trained, saved_data_config
from ..train import evaluate
from ..utils import device_problem


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run directory or checkpoint.pt")
    p.add_argument("--data-dir", help="dataset directory, if it moved since training")
    p.add_argument("--split", choices=("test", "val"), default="test")
    p.add_argument("--device", default="cpu")


def run(args) -> int:
    if device_problem(args.device):
        raise MixbitsError(f"--device: {device_problem(args.device)}")
    model, card, saved = load_trained(args.run, args.device)
    data = saved_data_config(args.run, args.data_dir)
    _, val_loader, test_loader, _ = build_loaders(data, saved.get("train_config", {}).get("seed", 0))
    metrics = evaluate(model, test_loader if args.split == "test" else val_loader, args.device)
    out = {"run": str(args.run), "split": args.split, "top1": metrics["top1"], "loss": metrics["loss"],
           "samples": metrics["samples"], "model": card.name,
           "policy": card.policy.describe() if card.policy else "float"}
    print(json.dumps(out, indent=2))
    return 0

