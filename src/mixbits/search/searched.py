"""The weights a training search ends with, kept as the fine-tune's start (the ``keep_weights`` option).

Written per budget to ``<run_dir>/searched/budget<i>.pt`` as a checkpoint of the *float* model: the quantized
layers' latent weights under the float layers' names, BatchNorm and every other float parameter as the search
left them, the quantizers' steps left out (the fine-tune builds its own quantizers over the policy's bits and
calibrates them). It loads like an ``--init`` float run's checkpoint: ``load_checkpoint(path)["model"]`` into
the float model. The search's ``SearchResult.info["finetune_init"]`` lists the files, one per budget.
"""

from __future__ import annotations

from pathlib import Path

from torch import Tensor

from ..errors import MixbitsError
from ..space import Policy
from ..train import save_checkpoint
from .base import SearchContext

QUANTIZER_PARTS = (".w_quant.", ".a_quant.", ".candidate_weights.")


def float_state(ctx: SearchContext, policy: Policy, candidate_weights: dict[str, list[Tensor]] | None = None) -> dict:
    """``ctx.model``'s weights as a float model's state dict; a layer with one latent weight per weight
    bit-width (DNAS ``weights: separate``) contributes the one of its bits under ``policy``."""
    state = {k: v.detach().clone() for k, v in ctx.model.state_dict().items()
             if not any(part in f".{k}" for part in QUANTIZER_PARTS)}
    for name, weights in (candidate_weights or {}).items():
        state[f"{name}.weight"] = weights[ctx.space.w_bits.index(policy[name][0])].detach().clone()
    return state


def searched_dir(ctx: SearchContext, method: str) -> Path:
    """Where the searched weights go; checked before a search starts, so a missing directory costs no training."""
    if ctx.run_dir is None:
        raise MixbitsError(f"{method}: keep_weights writes the searched weights beside the search, but there is no "
                           "run directory; give the search one (SearchContext.run_dir, or --out) or set "
                           "keep_weights: false")
    return Path(ctx.run_dir) / "searched"


def save_searched_weights(ctx: SearchContext, method: str, index: int, policy: Policy,
                          candidate_weights: dict[str, list[Tensor]] | None = None) -> str:
    """Write budget ``index``'s searched weights; returns the path."""
    path = searched_dir(ctx, method) / f"budget{index}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(path, {"model": float_state(ctx, policy, candidate_weights), "policy": policy.to_dict(),
                           "method": method})
    return str(path)
