"""The shared training loop, its optimiser/schedule, checkpoints, distillation, BN recalibration, evaluation."""

from .bn import recalibrate_bn
from .checkpoint import load_checkpoint, load_model_state, rng_state, save_checkpoint, set_rng_state
from .distill import kd_loss
from .evaluate import evaluate
from .loop import Hook, Objective, StepOutput, TrainResult, TrainState, fit, supervised_objective
from .optim import TrainConfig, build_optimizer, build_scheduler, lr_factor, param_groups

__all__ = [
    "Hook",
    "Objective",
    "StepOutput",
    "TrainConfig",
    "TrainResult",
    "TrainState",
    "build_optimizer",
    "build_scheduler",
    "evaluate",
    "fit",
    "kd_loss",
    "load_checkpoint",
    "load_model_state",
    "lr_factor",
    "param_groups",
    "recalibrate_bn",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
    "supervised_objective",
]
