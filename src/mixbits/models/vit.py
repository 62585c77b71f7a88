"""A small vision transformer classifier, written as a user would write one: nn.MultiheadAttention blocks.

mixbits turns each ``nn.MultiheadAttention`` into separate linear projections before quantizing
(``mixbits.quant.prepare_model``), so this model exercises that path end to end.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import MixbitsError
from . import MODELS


class Block(nn.Module):
    """Pre-norm transformer block: attention, then a GELU MLP, each with a residual."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    """Patch embedding (strided conv), class token, learned positions, ``depth`` blocks, linear head."""

    def __init__(self, num_classes: int = 10, in_chans: int = 3, image_size: int = 28, patch: int = 4,
                 dim: int = 64, depth: int = 2, heads: int = 4, mlp_ratio: float = 2.0):
        super().__init__()
        if image_size % patch:
            raise MixbitsError(f"image_size {image_size} is not a multiple of patch {patch}; choose a patch that "
                               "divides the image size")
        self.grid = image_size // patch
        self.patch_embed = nn.Conv2d(in_chans, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, self.grid * self.grid + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (batch, tokens, dim)
        if x.shape[1] != self.grid * self.grid:
            raise MixbitsError(f"input gives {x.shape[1]} patches where the model expects {self.grid ** 2}; build "
                               "it with image_size set to the input's size")
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        return self.head(self.norm(self.blocks(x))[:, 0])


@MODELS.register("vit_tiny")
def vit_tiny(num_classes: int = 10, in_chans: int = 3, **kwargs) -> nn.Module:
    """Tiny vision transformer (patch 4, dim 64, 2 blocks of 4-head attention); ``image_size`` defaults to 28."""
    return TinyViT(num_classes=num_classes, in_chans=in_chans, **kwargs)
