"""Data-parallel training with ``torch.distributed``: process groups from torchrun's environment, and the
few collectives mixbits needs.

Every function here also works in a plain single process (no process group): collectives then return
their input unchanged, so callers need no ``if distributed`` branches of their own.

    torchrun --standalone --nproc_per_node 8 -m mixbits train --device cuda ...
"""

from __future__ import annotations

import gc
import io
import math
import os
import pickle
from dataclasses import dataclass
from types import MappingProxyType

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..errors import MixbitsError
from ..quant.layers import QuantLayer
from ..quant.quantizer import LsqQuantizer


@dataclass(frozen=True)
class DistContext:
    """Where this process sits in the job; ``world_size == 1`` for an ordinary single-process run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # this context created the process group, so cleanup() destroys it

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def is_main(self) -> bool:
        """Rank 0: the one process that writes files and prints."""
        return self.rank == 0

    def cleanup(self) -> None:
        """Destroy the process group if this context created it (a caller's own group is left alone)."""
        if self.owns_group:
            cleanup()


def init_from_env(device: str | torch.device = "cpu") -> DistContext:
    """Join the job torchrun describes in RANK / WORLD_SIZE / LOCAL_RANK (and MASTER_ADDR / MASTER_PORT).

    Without WORLD_SIZE > 1 this is a single process on ``device``. Otherwise the backend is NCCL for CUDA
    and Gloo for the CPU, and a CUDA process uses GPU ``LOCAL_RANK`` whatever index ``device`` names. A
    process group that already exists (created by the caller) is reused and left to the caller to destroy.
    """
    device = torch.device(device)
    world_size = _env_int("WORLD_SIZE", 1)
    if world_size <= 1:
        return DistContext(device=device)
    if not dist.is_available():
        raise MixbitsError(f"WORLD_SIZE={world_size} asks for distributed training, but this torch build has no "
                           "torch.distributed; install a build with it or run a single process")
    if device.type not in ("cpu", "cuda"):
        raise MixbitsError(f"distributed training runs on cpu (gloo) or cuda (nccl), got device {str(device)!r}")
    local_rank = _env_int("LOCAL_RANK", 0)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, device, owns)


def launch_rank() -> int:
    """This process's rank as torchrun set it (0 for a plain process), readable with no process group."""
    return _env_int("RANK", 0)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value else default
    except ValueError:
        raise MixbitsError(f"environment variable {name}={value!r} must be an integer; torchrun sets it "
                           "for you (launch with torchrun, or unset it)") from None


def is_distributed() -> bool:
    """Is a process group of more than one process active?"""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_main() -> bool:
    """True on rank 0, and in any single process."""
    return not is_distributed() or dist.get_rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def cleanup() -> None:
    """Destroy the default process group, if any.

    Unreachable DDP wrappers are garbage-collected first: with gloo, one that survives until interpreter
    exit can abort the process ("terminate called without an active exception") after a successful run.
    """
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


# --- collectives -------------------------------------------------------------------------------------------------


def broadcast_object(obj, src: int = 0):
    """``obj`` as rank ``src`` holds it, on every rank (others may pass None): e.g. a policy chosen on rank 0.

    Read-only mappings (a Policy keeps its bits in one) are sent as the dicts they wrap, so any object
    pickle can handle apart from those travels too.
    """
    if not is_distributed():
        return obj
    box = [_dumps(obj) if dist.get_rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return pickle.loads(box[0])


class _Pickler(pickle.Pickler):
    def reducer_override(self, obj):
        if isinstance(obj, MappingProxyType):
            return _mappingproxy, (dict(obj),)
        return NotImplemented


def _mappingproxy(d: dict) -> MappingProxyType:
    return MappingProxyType(d)


def _dumps(obj) -> bytes:
    buf = io.BytesIO()
    _Pickler(buf, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
    return buf.getvalue()


@torch.no_grad()
def broadcast_module_state(module: nn.Module, src: int = 0) -> None:
    """Copy every parameter and buffer of rank ``src``'s ``module`` into the other ranks' copies, in place.

    Used after quantizer calibration, so every rank starts from the same step sizes and signs. The
    quantizers' Python caches (ready flag, sign) are refreshed from the received buffers, as a
    ``load_state_dict`` would. Python-only state (a quantizer's current ``bits``) is not sent: set it the
    same way on every rank (e.g. ``apply_policy`` with a broadcast policy).
    """
    if is_distributed():
        for tensor in module.state_dict().values():
            dist.broadcast(tensor, src=src)
    for m in module.modules():
        if isinstance(m, LsqQuantizer):
            m._refresh_cache()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """In place: the sum of ``tensor`` over all ranks (returned for chaining)."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """In place: the mean of ``tensor`` over all ranks (a floating tensor; returned for chaining)."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor.div_(dist.get_world_size())
    return tensor


# --- the model wrapper -------------------------------------------------------------------------------------------


def wrap_ddp(module: nn.Module, ctx: DistContext) -> nn.Module:
    """``module`` in DistributedDataParallel when ``ctx`` is distributed, else unchanged.

    Insert quantizers, calibrate and ``broadcast_module_state`` before wrapping: DDP registers the
    parameters it synchronises when it is built. Activation step gradients are rescaled to the global
    batch (see :func:`_global_batch_step_grads`), so the run trains as one process with that batch would.
    """
    if not ctx.distributed:
        return module
    _global_batch_step_grads(module, ctx.world_size)
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids)


def _global_batch_step_grads(module: nn.Module, world_size: int) -> None:
    """Divide every activation quantizer's step gradient by sqrt(world_size), once per parameter.

    LSQ scales a step's gradient by 1/sqrt(elements quantized per forward). A weight quantizer sees the
    same elements on every rank, but an activation quantizer sees only this rank's 1/world_size of the
    global batch, so its gradient would come out sqrt(world_size) times larger than in one process. The
    hook stays on the parameter for the life of the module (it is meant for this process group).
    """
    factor = 1.0 / math.sqrt(world_size)
    for m in module.modules():
        steps = m.a_quant.steps if isinstance(m, QuantLayer) else None
        if steps is not None and not getattr(steps, "_global_batch_grads", False):
            steps.register_hook(lambda grad: grad * factor)
            steps._global_batch_grads = True


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside a DDP wrapper (its state-dict keys carry no ``module.`` prefix)."""
    return model.module if isinstance(model, DistributedDataParallel) else model
