"""`QEmbedding`: ``nn.Embedding`` with its table quantized (weight-only: its input is token ids, not activations).

It keeps the ``QuantLayer`` interface so that every search method drives it like the other layers, and
so it has an activation quantizer too; that one never runs (``weight_only``), its bits are ignored, and
the cost model gives the layer no MACs (a lookup multiplies nothing), so its activation bits cost nothing
and change nothing. The looked-up rows are the quantized table's rows: code times step, one rounding,
the same number the exported ``DequantizeLinear -> Gather`` gives. Per-channel steps are one per row
(per token).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import MixbitsError
from .layers import QuantLayer
from .quantizer import LsqQuantizer


class QEmbedding(QuantLayer, nn.Embedding):
    """``nn.Embedding`` whose table is quantized by ``w_quant``; ``a_quant`` is inert (see the module doc)."""

    weight_only = True

    def __init__(self, *args, w_bits: Sequence[int] = (8,), a_bits: Sequence[int] = (8,), per_channel: bool = False,
                 **kwargs):
        super().__init__(*args, **kwargs)
        if self.max_norm is not None:  # it renormalises rows in place, under the quantizer's feet
            raise MixbitsError("cannot quantize an nn.Embedding with max_norm set; renormalise the table once "
                               "and build the layer without max_norm")
        device = self.weight.device
        self.w_quant = LsqQuantizer(w_bits, signed=True, channels=self.weight.shape[0] if per_channel else 1)
        self.w_quant.to(device)
        self.a_quant = _inert_quantizer(a_bits).to(device)
        self._init_quant_state()

    @classmethod
    def from_float(cls, emb: nn.Embedding, w_bits, a_bits, per_channel: bool = False) -> QEmbedding:
        q = cls(emb.num_embeddings, emb.embedding_dim, padding_idx=emb.padding_idx, max_norm=emb.max_norm,
                norm_type=emb.norm_type, scale_grad_by_freq=emb.scale_grad_by_freq, sparse=emb.sparse,
                device=emb.weight.device, dtype=emb.weight.dtype, w_bits=w_bits, a_bits=a_bits,
                per_channel=per_channel)
        q.weight = emb.weight
        q.train(emb.training)
        return q

    def forward(self, x: Tensor) -> Tensor:
        self._apply_sampler()
        return F.embedding(x, self.quantized_weight(), self.padding_idx, None, self.norm_type,
                           self.scale_grad_by_freq, self.sparse)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, w_bits={self.w_quant.bits}, weight-only, mode={self.mode}"


def _inert_quantizer(a_bits: Sequence[int]) -> LsqQuantizer:
    """An activation quantizer that counts as calibrated (unsigned, unit steps) and is never applied."""
    quant = LsqQuantizer(a_bits, signed=False)
    with torch.no_grad():
        quant.initialized.fill_(True)
    quant._refresh_cache()
    return quant
