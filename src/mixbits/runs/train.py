"""A configured training run (what `mixbits train` runs): float pre-training, or QAT at a policy, written
to a run directory (config.yaml, checkpoint.pt, metrics.jsonl, result.json) that eval and export read.

Under torchrun every process trains its slice of each global batch in DistributedDataParallel and
rank 0 alone writes (see docs/distributed.md).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..compiler import fused_setting
from ..config import RunConfig
from ..cost import bitops, compression, kept_float_layers, profile, size_bytes
from ..data import build_loaders
from ..data.batches import model_input
from ..errors import MixbitsError
from ..pipeline import ModelCard, float_card, load_trained, quantized_model, resolve_checkpoint, training_space
from ..quant import set_fused
from ..train import (
    DistContext,
    barrier,
    broadcast_module_state,
    broadcast_object,
    evaluate,
    fit,
    init_from_env,
    load_checkpoint,
    load_model_state,
    wrap_ddp,
)
from ..utils import atomic_write_text, seed_everything
from .ownership import owned_run


@dataclass
class TrainOutcome:
    run_dir: Path
    result: dict
    rank: int = 0  # this process's rank in a distributed run (only rank 0 prints and writes)


def train(cfg: RunConfig, resume: bool = False, progress: bool | None = None, force: bool = False) -> TrainOutcome:
    """Train as ``cfg`` says; writes config.yaml, checkpoint.pt, metrics.jsonl and result.json to cfg.out.

    cfg.out must be new, empty or a training run's (``force`` writes into another job's output anyway).

    Under torchrun (WORLD_SIZE > 1) every process trains its slice of each global batch in
    DistributedDataParallel and rank 0 alone writes; every process returns the same result.
    """
    cfg.validate()
    ctx = init_from_env(cfg.device)
    try:
        outcome = _train(cfg, ctx, resume, progress, force)
        barrier()  # no rank tears the group down while another is still receiving
    finally:
        ctx.cleanup()
    return outcome


def _train(cfg: RunConfig, ctx: DistContext, resume: bool, progress: bool | None, force: bool) -> TrainOutcome:
    with owned_run(cfg, "train", ctx, force=force, resume=resume) as run_dir:
        if (run_dir / "checkpoint.pt").exists() and not resume:
            raise MixbitsError(f"run directory {str(run_dir)!r} already holds a checkpoint; pass --resume to "
                               f"continue it or choose another --out")
        return _train_owned(cfg, ctx, run_dir, resume, progress)


def _train_owned(cfg: RunConfig, ctx: DistContext, run_dir: Path, resume: bool, progress: bool | None) -> TrainOutcome:
    set_fused(fused_setting(cfg.quant.fused))
    seed_everything(cfg.train.seed)
    train_loader, val_loader, test_loader, train_set, global_loader = _loaders(cfg, ctx)
    card = float_card(cfg.model, train_set.num_classes, train_set.in_chans, train_set.image_size)
    model = card.float_model()
    teacher = _start_weights(model, cfg, card)
    example = model_input(next(iter(global_loader)))
    card.record_input(example)
    if cfg.quant.policy:
        card.space, card.policy = training_space(model, cfg.quant, cfg.quant.policy, example)
        card.per_channel = cfg.quant.per_channel
        model = quantized_model(card, model, calibration=example, init=cfg.quant.init)
    model.to(ctx.device)
    broadcast_module_state(model)  # every rank starts from rank 0's weights, steps and signs
    main = ctx.is_main()
    if main and not resume:  # a resumed run keeps its config.yaml until fit() has accepted the settings
        cfg.save(run_dir / "config.yaml")
    history = fit(wrap_ddp(model, ctx), train_loader, cfg.train, val_loader=val_loader, teacher=teacher,
                  run_dir=run_dir, resume=resume, device=ctx.device, extra_state={"model_card": card.to_dict()},
                  progress=progress, is_main_process=main).history
    result = None
    if main:  # the plain module on one process: exact, and no collective inside the forward
        if resume:
            cfg.save(run_dir / "config.yaml")
        result = {"run_dir": str(run_dir), **_summary(model, card, test_loader, ctx.device),
                  "train_seconds": sum(m["seconds"] for m in history)}  # every epoch's, across resumes
        atomic_write_text(run_dir / "result.json", json.dumps(result, indent=2) + "\n")
    return TrainOutcome(run_dir, broadcast_object(result), ctx.rank)


def _loaders(cfg: RunConfig, ctx: DistContext):
    """(train loader of this rank, val, test, train dataset, loader of whole global batches).

    Validation, test and the quantizer calibration batch (the first global batch) are what one process
    with batch data.batch_size x world size would see, so a distributed run matches that process.
    """
    seed = cfg.train.seed
    if not ctx.distributed:
        train_loader, val_loader, test_loader, train_set = build_loaders(cfg.data, seed)
        return train_loader, val_loader, test_loader, train_set, train_loader
    rank_train = build_loaders(cfg.data, seed, ctx.rank, ctx.world_size)[0]
    global_data = replace(cfg.data, batch_size=cfg.data.batch_size * ctx.world_size)
    global_train, val_loader, test_loader, train_set = build_loaders(global_data, seed)
    return rank_train, val_loader, test_loader, train_set, global_train


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
        stats = profile(card.float_model(), card.example_input())
        out.update({"policy": card.policy.describe(), "bitops": bitops(stats, card.policy),
                    "size_bytes": size_bytes(stats, card.policy), "compression": compression(stats, card.policy),
                    "kept_float": kept_float_layers(stats, card.policy)})
    return out
