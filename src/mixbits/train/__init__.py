"""The shared training loop, its optimiser/schedule, checkpoints, distillation, BN recalibration, evaluation,
and data-parallel (torch.distributed) helpers."""

from .bn import SUBNET_BN_BATCHES, recalibrate_bn
from .checkpoint import load_checkpoint, load_model_state, rng_state, save_checkpoint, set_rng_state
from .distill import kd_loss
from .distributed import (
    DistContext,
    all_reduce_mean,
    barrier,
    broadcast_module_state,
    broadcast_object,
    init_from_env,
    launch_rank,
    unwrap,
    wrap_ddp,
)
from .evaluate import evaluate
from .loop import (
    Hook,
    Objective,
    StepOutput,
    TrainResult,
    TrainState,
    fit,
    loss_objective,
    supervised_objective,
)
from .optim import TrainConfig, build_optimizer, build_scheduler, lr_factor, param_groups
from .stopping import Stopped, stop_on_signals

__all__ = [
    "DistContext",
    "Hook",
    "Objective",
    "StepOutput",
    "Stopped",
    "TrainConfig",
    "TrainResult",
    "TrainState",
    "all_reduce_mean",
    "barrier",
    "broadcast_module_state",
    "broadcast_object",
    "build_optimizer",
    "build_scheduler",
    "evaluate",
    "fit",
    "init_from_env",
    "kd_loss",
    "launch_rank",
    "load_checkpoint",
    "load_model_state",
    "loss_objective",
    "lr_factor",
    "param_groups",
    "recalibrate_bn",
    "SUBNET_BN_BATCHES",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
    "stop_on_signals",
    "supervised_objective",
    "unwrap",
    "wrap_ddp",
]
