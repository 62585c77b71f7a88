"""Arguments shared by the commands that run a configured job (train, search)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..config import RunConfig, load_config, shipped_configs


def add_config_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("configuration (later flags override earlier sources: defaults < --config < flags)")
    g.add_argument("--config", help="YAML config file, or the name of a shipped one (see `mixbits list configs`)")
    g.add_argument("--model", help="registered model name (`mixbits list models`), or a factory of your own: "
                                   "file.py:fn or module.path:fn, torchvision:NAME, timm:NAME (model.name)")
    g.add_argument("--data", help="dataset name: fashion-mnist, cifar10, cifar100, imagefolder, or a factory of "
                                  "your own returning (train, test) or (train, val, test) iterables of (inputs, "
                                  "targets) batches, the inputs a tensor (images, token ids, vectors) or a tuple or "
                                  "dict of tensors: file.py:fn or module.path:fn (data.name)")
    g.add_argument("--data-dir", help="dataset directory (data.root)")
    g.add_argument("--epochs", type=int, help="training epochs (train.epochs)")
    g.add_argument("--lr", type=float, help="peak learning rate (train.lr)")
    g.add_argument("--batch-size", type=int, help="training batch size (data.batch_size)")
    g.add_argument("--policy", help="train at this policy: uniform:4, uniform:w4a8 or a policy JSON (quant.policy)")
    g.add_argument("--init", help="start from this float checkpoint or run directory (init)")
    g.add_argument("--out", help="run directory (out)")
    g.add_argument("--device", help="cpu, cuda or cuda:N (device)")
    g.add_argument("--seed", type=int, help="random seed (train.seed)")
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any setting, e.g. --set train.weight_decay=1e-4 --set model.kwargs.width=0.5 (repeatable)")


_FLAGS = {"model": "model.name", "data": "data.name", "data_dir": "data.root", "epochs": "train.epochs",
          "lr": "train.lr", "batch_size": "data.batch_size", "policy": "quant.policy", "init": "init",
          "out": "out", "device": "device", "seed": "train.seed"}


def config_from_args(args, flags: dict[str, str] | None = None) -> RunConfig:
    """The run config from --config, the typed flags (``_FLAGS`` plus a command's own ``flags``: attribute ->
    setting), then --set. Flag values are taken as parsed: a path or a number never goes through YAML.

    With --resume and no --config, the run's own config.yaml takes the place of the defaults: the settings it
    was started with, which any flag given must then match (the run checks it)."""
    path = args.config
    if path and path in shipped_configs():
        path = shipped_configs()[path]
    recorded = Path(args.out or RunConfig().out) / "config.yaml"
    if path is None and getattr(args, "resume", False) and recorded.is_file():
        path = recorded
    overrides = [(key, getattr(args, flag)) for flag, key in {**_FLAGS, **(flags or {})}.items()
                 if getattr(args, flag, None) is not None]
    return load_config(path, overrides + list(args.set))
