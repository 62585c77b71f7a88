"""``mixbits.finetune``: quantization-aware training of a float model at a policy, through the shared loop."""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Iterable

import torch
from torch import nn

from ..data.batches import Batches
from ..errors import MixbitsError
from ..rundir import claim_output_dir, record_settings
from ..search import SearchResult
from ..space import SearchSpace
from ..train import (
    SUBNET_BN_BATCHES,
    TrainConfig,
    fit,
    load_checkpoint,
    load_model_state,
    loss_objective,
    supervised_objective,
)
from ..train.evaluate import LossFn
from .arguments import check_device, check_int, check_model, check_optional_callable, check_path
from .model import PolicySpec, _quantized, example_of, prepared_copy, recalibrate_on_first_batches

# Fine-tuning starts from trained weights, so it takes a tenth of the from-scratch SGD rate (TrainConfig's
# 0.1), as the shipped QAT recipe does; Adam's usual fine-tuning rate otherwise.
FINETUNE_LR = {"sgd": 0.01, "adam": 1e-4}


def finetune(model: nn.Module, policy: PolicySpec | SearchResult, train: Iterable, *, epochs: int,
             lr: float | None = None, teacher: nn.Module | None = None, val: Iterable | None = None,
             index: int = 0, space: SearchSpace | None = None, example_input=None, loss_fn: LossFn | None = None,
             run_dir: str | os.PathLike | None = None, resume: bool = False, progress: bool | None = None,
             seed: int = 0, device: str | torch.device = "cpu", per_channel: bool = False, init: str = "fitted",
             force: bool = False,
             **settings) -> nn.Module:
    """A copy of the float ``model`` quantized at ``policy`` and trained for ``epochs``; returned in eval mode.

    ``policy``: a Policy, ``"uniform:4"``/``"uniform:w8a8"``/a policy JSON, or a :class:`SearchResult`
    (its policy ``index``, its space, the method's own fine-tune settings, e.g. SDQ's distillation, and
    the searched weights as the start when the search kept them: ``keep_weights`` of dnas/ssps/dmpq/oneshot).
    ``lr`` defaults to ``FINETUNE_LR`` (SGD 0.01, Adam 1e-4) with a cosine schedule. ``teacher``: a model
    to distil from when ``kd_alpha`` > 0 (default: the float model itself). ``settings`` are any
    :class:`mixbits.train.TrainConfig` field (``kd_alpha=0.5``, ``weight_decay=1e-4``, ``optimizer="adam"``).
    With ``run_dir`` the run checkpoints every epoch and ``resume=True`` continues it exactly; ``run_dir``
    must be new, empty or a training run's (``force=True`` writes into another job's directory anyway), one
    process holds it at a time, and a resume must ask for the policy it was started with (settings.json).
    ``init``: the quantizers' starting steps, ``"fitted"`` (as the searches start) or ``"lsq"`` (see
    :func:`mixbits.quantize`).
    """
    check_model(model)
    check_int(epochs, "epochs", minimum=1)
    check_int(seed, "seed")
    check_optional_callable(loss_fn, "loss_fn")
    check_path(run_dir, "run_dir")
    check_device(device)
    if teacher is not None:
        check_model(teacher, "teacher")
    start = None
    if isinstance(policy, SearchResult):
        result = policy
        if not 0 <= index < len(result.policies):
            raise MixbitsError(f"index {index} is out of range; the search found {len(result.policies)} policies")
        policy, space = result.policies[index], space if space is not None else result.space
        settings = {**result.finetune, **settings}
        start = (result.info.get("finetune_init") or [None] * len(result.policies))[index]
    cfg = _train_config(epochs, lr, seed, settings)
    if loss_fn is not None and cfg.kd_alpha > 0:
        raise MixbitsError("kd_alpha > 0 distils logits, which a custom loss_fn does not expose; set kd_alpha=0 "
                           "or fold distillation into your loss_fn")
    train = Batches(train, "train")
    float_model = prepared_copy(model)
    if cfg.kd_alpha > 0 and teacher is None:
        teacher = copy.deepcopy(float_model).eval()
    if start is not None:  # the search's trained latent weights, saved under the float model's names
        load_model_state(float_model, load_checkpoint(start)["model"], str(start))
        # Their BatchNorm statistics were gathered by the quantized supernet; calibrating the fine-tune's
        # quantizers through them mis-sets the activation steps (a 2-bit MobileNetV2 then trained at chance).
        recalibrate_on_first_batches(float_model, train, SUBNET_BN_BATCHES, next(float_model.parameters()).device)
    device = torch.device(device)
    qmodel, policy = _quantized(float_model.to(device), policy, example_of(train, example_input), space, per_channel,
                                init)
    with contextlib.ExitStack() as owned:
        if run_dir is not None:
            owned.enter_context(claim_output_dir(run_dir, "train", force=force, resume=resume, flag="run_dir"))
            record_settings(run_dir, {"policy": policy.to_dict(), "per_channel": per_channel, "init": init},
                            resume=resume, force=force)
        fit(qmodel, train, cfg, val_loader=Batches(val, "val") if val is not None else None,
            objective=loss_objective(loss_fn) if loss_fn is not None else supervised_objective,
            teacher=teacher if cfg.kd_alpha > 0 else None, run_dir=run_dir, resume=resume, device=device,
            progress=progress)
    return qmodel.eval()


def _train_config(epochs: int, lr: float | None, seed: int, settings: dict) -> TrainConfig:
    known = TrainConfig.__dataclass_fields__
    unknown = [k for k in settings if k not in known]
    if unknown:
        raise MixbitsError(f"unknown fine-tune setting(s) {unknown}; expected TrainConfig fields: {', '.join(known)}")
    optimizer = settings.get("optimizer", "sgd")
    if lr is None:
        lr = FINETUNE_LR.get(optimizer, FINETUNE_LR["sgd"])
    return TrainConfig(**{**settings, "epochs": epochs, "lr": lr, "seed": seed})
