"""A small GPT-style causal language model in plain torch, for tests and benchmarks nobody downloads.

Same call convention as a Hugging Face causal LM's forward on ``input_ids``: ``model(ids)`` with ``ids`` a
LongTensor (batch, tokens) returns logits (batch, tokens, vocab). Layer names follow the Llama naming
(``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``, ``up_proj``, ``down_proj``, ``lm_head``) so name rules written
for real models read the same here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class TinyLMConfig:
    vocab: int = 256  # bytes: nothing to download
    context: int = 128
    width: int = 192
    layers: int = 4
    heads: int = 6
    mlp_ratio: int = 4

    def to_dict(self) -> dict:
        return asdict(self)


class Attention(nn.Module):
    def __init__(self, cfg: TinyLMConfig):
        super().__init__()
        self.heads = cfg.heads
        self.q_proj = nn.Linear(cfg.width, cfg.width, bias=False)
        self.k_proj = nn.Linear(cfg.width, cfg.width, bias=False)
        self.v_proj = nn.Linear(cfg.width, cfg.width, bias=False)
        self.o_proj = nn.Linear(cfg.width, cfg.width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape

        def split(y):
            return y.view(b, t, self.heads, d // self.heads).transpose(1, 2)

        y = F.scaled_dot_product_attention(split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)),
                                           is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, d))


class MLP(nn.Module):
    def __init__(self, cfg: TinyLMConfig):
        super().__init__()
        self.up_proj = nn.Linear(cfg.width, cfg.mlp_ratio * cfg.width, bias=False)
        self.down_proj = nn.Linear(cfg.mlp_ratio * cfg.width, cfg.width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.up_proj(x)))


class Block(nn.Module):
    def __init__(self, cfg: TinyLMConfig):
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(cfg.width), Attention(cfg)
        self.ln2, self.mlp = nn.LayerNorm(cfg.width), MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TinyCausalLM(nn.Module):
    def __init__(self, cfg: TinyLMConfig = TinyLMConfig()):
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab, cfg.width)
        self.pos = nn.Embedding(cfg.context, cfg.width)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(cfg.width)
        self.lm_head = nn.Linear(cfg.width, cfg.vocab, bias=False)
        self.apply(_init)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.norm(x))


def _init(module: nn.Module) -> None:
    # GPT-2's scale: small normal weights keep the first losses near log(vocab)
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
