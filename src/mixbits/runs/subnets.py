"""Policies run on a trained weight-sharing supernet, without retraining.

A retraining-free search (``--method oneshot``) writes its supernet (weights and space) under its run
directory. For each found policy, :func:`evaluate_subnets` sets the bits, recalibrates BatchNorm on
training batches (the statistics of a subnet differ from the supernet's; a supernet trained with one
BatchNorm per bit-width pair uses its own and is written with each layer's pair as a plain BatchNorm),
measures the test split and
writes a normal run checkpoint with a model card, so ``mixbits eval``, ``mixbits export`` and
``mixbits report`` read it like any trained run.
"""

from __future__ import annotations

import copy
import itertools
import json
import os
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from ..cost import bitops, compression, kept_float_layers, profile, size_bytes
from ..pipeline import ModelCard
from ..quant import apply_policy, quantize_model
from ..quant.pair_bn import PairBatchNorm, attach_pair_bn, collapse_pair_bn
from ..space import Policy, SearchSpace
from ..train import SUBNET_BN_BATCHES, evaluate, load_checkpoint, load_model_state, recalibrate_bn, save_checkpoint
from ..utils import atomic_write_text


def load_supernet(path: str | os.PathLike, card: ModelCard, per_channel: bool) -> tuple[nn.Module, SearchSpace]:
    """The supernet rebuilt over its own space from ``card``'s float model, with the trained weights (and its
    BatchNorm per bit-width pair, if it was trained with them)."""
    saved = load_checkpoint(path)
    space = SearchSpace.from_dict(saved["space"])
    model = quantize_model(card.float_model(), space, per_channel=per_channel)
    attach_pair_bn(model, saved.get("info", {}).get("pair_bn") or {})
    load_model_state(model, saved["model"], str(path))
    return model, space


def evaluate_subnets(supernet: str | os.PathLike, card: ModelCard, per_channel: bool, policies: list[Policy],
                     train_loader, test_loader, out_dirs: list[Path], bn_batches: int = SUBNET_BN_BATCHES,
                     device: torch.device | str = "cpu") -> list[dict]:
    """Test each policy on the supernet's weights after BN recalibration; one run directory per policy.

    Returns per policy ``{"test_top1", "test_loss", "run_dir"}``; each ``out_dirs[i]`` gets checkpoint.pt
    (recalibrated weights and the model card) and result.json.
    """
    model, space = load_supernet(supernet, card, per_channel)
    model.to(device)
    stats = profile(card.float_model(), card.example_input())
    if hasattr(train_loader, "set_epoch"):
        train_loader.set_epoch(0)  # the same batches whether the search just trained or was resumed
    bn_source = list(itertools.islice(iter(train_loader), bn_batches))  # the same batches for every policy
    rows = []
    pair_bn = any(isinstance(m, PairBatchNorm) for m in model.modules())
    for policy, run_dir in zip(policies, out_dirs, strict=True):
        apply_policy(model, policy)
        if not pair_bn:  # a BatchNorm per bit-width pair already holds the policy's statistics
            recalibrate_bn(model, bn_source, device=device)
        metrics = evaluate(model, test_loader, device)
        subnet_card = replace(card, space=space, policy=policy, per_channel=per_channel)
        run_dir.mkdir(parents=True, exist_ok=True)
        subnet = collapse_pair_bn(copy.deepcopy(model)) if pair_bn else model  # an ordinary quantized model
        save_checkpoint(run_dir / "checkpoint.pt", {"model": subnet.state_dict(), "epoch": 0,
                                                    "extra": {"model_card": subnet_card.to_dict()}})
        result = {"run_dir": str(run_dir), "test_top1": metrics["top1"], "test_loss": metrics["loss"],
                  "model": card.name, "policy": policy.describe(), "bitops": bitops(stats, policy),
                  "size_bytes": size_bytes(stats, policy), "compression": compression(stats, policy),
                  "kept_float": kept_float_layers(stats, policy),
                  "retraining_free": True, "bn_batches": 0 if pair_bn else len(bn_source), "train_seconds": 0.0}
        atomic_write_text(run_dir / "result.json", json.dumps(result, indent=2) + "\n")
        rows.append(result)
    return rows
