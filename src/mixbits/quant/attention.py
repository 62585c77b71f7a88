"""Make ``nn.MultiheadAttention`` quantizable: the same computation with its projections as ``nn.Linear``.

``nn.MultiheadAttention`` keeps its q/k/v projections as one packed parameter and calls its output
projection's weight directly, so swapping modules by name can neither quantize them nor count their
MACs. :func:`prepare_model` replaces each one by :class:`SplitAttention`, which holds four
``nn.Linear`` (``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``) with the same weights and gives the
same outputs; the two products between activations (scores and the weighted sum of values) stay float.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import MixbitsError


class SplitAttention(nn.Module):
    """Multi-head attention with separate ``nn.Linear`` projections; the call signature of nn.MultiheadAttention.

    The packed-projection attributes PyTorch's transformer layers read to choose their fused fast path
    (``torch._transformer_encoder_layer_fwd``, which would run the float weights and skip every quantized
    layer) say there is no packed projection, so ``nn.TransformerEncoderLayer`` takes its ordinary path,
    as it does for an attention built with ``bias=False``.
    """

    in_proj_weight = None
    in_proj_bias = None
    _qkv_same_embed_dim = False

    def __init__(self, embed_dim: int, num_heads: int, bias: bool = True, batch_first: bool = False,
                 dropout: float = 0.0, kdim: int | None = None, vdim: int | None = None):
        super().__init__()
        if embed_dim % num_heads:
            raise MixbitsError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.embed_dim, self.num_heads, self.batch_first, self.dropout = embed_dim, num_heads, batch_first, dropout
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.k_proj = nn.Linear(kdim or embed_dim, embed_dim, bias=bias)
        self.v_proj = nn.Linear(vdim or embed_dim, embed_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)

    @classmethod
    def from_mha(cls, mha: nn.MultiheadAttention, name: str = "") -> SplitAttention:
        if mha.bias_k is not None or mha.add_zero_attn:
            raise MixbitsError(f"attention {name or type(mha).__name__} uses add_bias_kv or add_zero_attn, which "
                               "mixbits cannot split into linear layers; leave it out of quantization")
        new = cls(mha.embed_dim, mha.num_heads, bias=mha.in_proj_bias is not None, batch_first=mha.batch_first,
                  dropout=mha.dropout, kdim=mha.kdim, vdim=mha.vdim)
        e = mha.embed_dim
        with torch.no_grad():
            if mha.in_proj_weight is not None:
                weights = mha.in_proj_weight.split(e)
            else:
                weights = (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)
            biases = mha.in_proj_bias.split(e) if mha.in_proj_bias is not None else (None, None, None)
            for proj, w, b in zip((new.q_proj, new.k_proj, new.v_proj), weights, biases, strict=True):
                proj.weight.copy_(w)
                if b is not None:
                    proj.bias.copy_(b)
            new.out_proj.weight.copy_(mha.out_proj.weight)
            if mha.out_proj.bias is not None:
                new.out_proj.bias.copy_(mha.out_proj.bias)
        return new.to(mha.out_proj.weight.device).train(mha.training)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
                need_weights: bool = True, attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        # From here on (batch, length, features): the batch stays the leading dim of every projection's input,
        # as an exported graph with a dynamic batch needs.
        q, k, v = self._heads(self.q_proj(query)), self._heads(self.k_proj(key)), self._heads(self.v_proj(value))
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (batch, heads, L, S)
        scores = scores + _additive_mask(attn_mask, key_padding_mask, is_causal, scores)
        weights = scores.softmax(dim=-1)
        dropped = F.dropout(weights, self.dropout, self.training) if self.dropout > 0 else weights
        out = self.out_proj((dropped @ v).transpose(1, 2).flatten(2))
        if unbatched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        weights = weights.mean(dim=1) if average_attn_weights else weights
        return out, weights.squeeze(0) if unbatched else weights

    def _heads(self, x: Tensor) -> Tensor:
        """(batch, length, features) -> (batch, heads, length, head features)."""
        return x.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)


def _additive_mask(attn_mask: Tensor | None, key_padding_mask: Tensor | None, is_causal: bool,
                   scores: Tensor) -> Tensor | float:
    """Masks as one tensor added to the scores (True or -inf = not attended), as nn.MultiheadAttention reads them."""
    total: Tensor | float = 0.0
    length, source = scores.shape[-2:]
    if attn_mask is None and is_causal:
        attn_mask = torch.ones(length, source, dtype=torch.bool, device=scores.device).triu(1)
    if attn_mask is not None:
        mask = _as_additive(attn_mask, scores)
        total = total + (mask.view(scores.shape[0], -1, length, source) if mask.dim() == 3 else mask)
    if key_padding_mask is not None:
        total = total + _as_additive(key_padding_mask, scores)[:, None, None, :]
    return total


def _as_additive(mask: Tensor, like: Tensor) -> Tensor:
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=like.dtype, device=like.device).masked_fill(mask, float("-inf"))
    return mask.to(like.dtype)


def prepare_model(model: nn.Module) -> list[str]:
    """Replace every ``nn.MultiheadAttention`` of ``model`` (in place) by an equal :class:`SplitAttention`.

    Returns the names replaced. Called wherever mixbits takes a user's model, before the search space is
    built, so the attention projections are quantized and their MACs counted like any other linear layer.
    """
    replaced = [name for name, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]
    for name in replaced:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, SplitAttention.from_mha(getattr(parent, child), name))
    for m in model.modules():
        # What nn.TransformerEncoder decides at construction when its layers cannot take the fused path: no
        # nested tensors (its padded-batch shortcut hands them to the fused layer only).
        if isinstance(m, nn.TransformerEncoder) and any(isinstance(a, SplitAttention) for a in m.modules()):
            m.use_nested_tensor = False
    return replaced
