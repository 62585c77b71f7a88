"""`mixbits eval RUN`: top-1 and loss of a trained run (float or quantized) on the test split.

    mixbits eval runs/w4a4 [--data-dir DIR] [--split test|val]
"""

from __future__ import annotations

import argparse
import json

import yaml

from ..data import DataConfig, build_loaders
from ..pipeline import load_trained, resolve_checkpoint
from ..train import evaluate


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run directory or checkpoint.pt")
    p.add_argument("--data-dir", help="dataset directory, if it moved since training")
    p.add_argument("--split", choices=("test", "val"), default="test")
    p.add_argument("--device", default="cpu")


def run(args) -> int:
    model, card, saved = load_trained(args.run, args.device)
    data = _data_config(args)
    _, val_loader, test_loader, _ = build_loaders(data, saved.get("train_config", {}).get("seed", 0))
    metrics = evaluate(model, test_loader if args.split == "test" else val_loader, args.device)
    out = {"run": str(args.run), "split": args.split, "top1": metrics["top1"], "loss": metrics["loss"],
           "samples": metrics["samples"], "model": card.name,
           "policy": card.policy.describe() if card.policy else "float"}
    print(json.dumps(out, indent=2))
    return 0


def _data_config(args) -> DataConfig:
    """The data settings the run was trained with (from its config.yaml), with --data-dir applied."""
    config_file = resolve_checkpoint(args.run).parent / "config.yaml"
    data = DataConfig()
    if config_file.is_file():
        saved = (yaml.safe_load(config_file.read_text()) or {}).get("data", {})
        data = DataConfig(**{k: v for k, v in saved.items() if k in DataConfig.__dataclass_fields__})
    if args.data_dir:
        data.root = args.data_dir
    return data
