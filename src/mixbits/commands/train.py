"""`mixbits train`: float pre-training, or quantization-aware training of a policy (uniform or from a file).

    mixbits train --model resnet20 --epochs 10 --out runs/fp
    mixbits train --policy uniform:4 --init runs/fp --epochs 5 --out runs/w4a4
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import RunConfig
from ..cost import bitops, compression, profile, size_bytes
from ..data import build_loaders
from ..errors import MixbitsError
from ..pipeline import ModelCard, float_card, load_trained, quantized_model, resolve_checkpoint, training_space
from ..quant import set_fused
from ..train import evaluate, fit, load_checkpoint, load_model_state
from ..utils import atomic_write_text, seed_everything
from .common import add_config_arguments, config_from_args


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p)
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")


@dataclass
class TrainOutcome:
    run_dir: Path
    result: dict


def run(args) -> int:
    outcome = train(config_from_args(args), resume=args.resume)
    print(json.dumps(outcome.result, indent=2))
    return 0


def train(cfg: RunConfig, resume: bool = False, progress: bool | None = None) -> TrainOutcome:
    """Train as ``cfg`` says; writes config.yaml, checkpoint.pt, metrics.jsonl and result.json to cfg.out."""
    cfg.validate()
    run_dir = Path(cfg.out)
    if (run_dir / "checkpoint.pt").exists() and not resume:
        raise MixbitsError(f"run directory {str(run_dir)!r} already holds a checkpoint; pass --resume to continue "
                           f"it or choose another --out")
    set_fused(cfg.quant.fused)
    seed_everything(cfg.train.seed)
    train_loader, val_loader, test_loader, train_set = build_loaders(cfg.data, cfg.train.seed)
    card = float_card(cfg.model, train_set.num_classes, train_set.in_chans, train_set.image_size)
    model = card.float_model()
    teacher = _start_weights(model, cfg, card)
    if cfg.quant.policy:
        card.space, card.policy = training_space(model, cfg.quant, cfg.quant.policy)
        card.per_channel = cfg.quant.per_channel
        model = quantized_model(card, model, calibration=next(iter(train_loader))[0])
    model.to(cfg.device)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.save(run_dir / "config.yaml")
    fit(model, train_loader, cfg.train, val_loader=val_loader, teacher=teacher, run_dir=run_dir, resume=resume,
        device=cfg.device, extra_state={"model_card": card.to_dict()}, progress=progress)
    result = {"run_dir": str(run_dir), **_summary(model, card, test_loader, cfg.device)}
    atomic_write_text(run_dir / "result.json", json.dumps(result, indent=2) + "\n")
    return TrainOutcome(run_dir, result)


def _start_weights(model: torch.nn.Module, cfg: RunConfig, card: ModelCard) -> torch.nn.Module | None:
    """Load ``cfg.init`` into the float model; return the teacher for distillation (the init model) if asked."""
    if cfg.init is None:
        if cfg.train.kd_alpha > 0:
            raise MixbitsError("train.kd_alpha > 0 needs a teacher: pass --init with a trained float checkpoint")
        return None
    source = resolve_checkpoint(cfg.init)
    saved = load_checkpoint(source)
    init_card = saved.get("extra", {}).get("model_card", {})
    if init_card.get("space"):
        raise MixbitsError(f"--init {cfg.init} is a quantized checkpoint; start from a float (pre-trained) one")
    load_model_state(model, saved["model"], str(source))
    if cfg.train.kd_alpha <= 0:
        return None
    teacher, _, _ = load_trained(source, cfg.device)
    return teacher.eval()


def _summary(model, card: ModelCard, test_loader, device) -> dict:
    metrics = evaluate(model, test_loader, device)
    out = {"test_top1": metrics["top1"], "test_loss": metrics["loss"], "model": card.name}
    if card.policy is not None:
        stats = profile(card.float_model(), card.input_shape)
        out.update({"policy": card.policy.describe(), "bitops": bitops(stats, card.policy),
                    "size_bytes": size_bytes(stats, card.policy), "compression": compression(stats, card.policy)})
    return out
