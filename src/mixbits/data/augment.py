"""Batched, vectorised image augmentation driven by a ``torch.Generator`` (so every run is reproducible).

All functions take a whole ``N x C x H x W`` batch; there is no per-image Python work.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..errors import MixbitsError


def _check_batch(x: torch.Tensor, what: str) -> None:
    if x.dim() != 4:
        raise MixbitsError(f"{what} expects an N x C x H x W batch, got shape {tuple(x.shape)}.")


def random_crop(x: torch.Tensor, padding: int, gen: torch.Generator | None = None) -> torch.Tensor:
    """Zero-pad every image by ``padding`` then crop it back to H x W at its own random offset."""
    _check_batch(x, "random_crop")
    if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
        raise MixbitsError(f"random_crop padding must be a non-negative integer, got {padding!r}.")
    if padding == 0:
        return x
    n, c, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))
    top = torch.randint(0, 2 * padding + 1, (n,), generator=gen)
    left = torch.randint(0, 2 * padding + 1, (n,), generator=gen)
    # One flat gather per batch: output pixel (i, j) of image k reads padded pixel (top[k] + i, left[k] + j).
    padded_w = w + 2 * padding
    grid = (torch.arange(h)[:, None] * padded_w + torch.arange(w)[None, :]).view(1, -1)
    flat_index = (grid + (top * padded_w + left)[:, None])[:, None, :].expand(n, c, h * w)
    return padded.reshape(n, c, -1).gather(2, flat_index).view(n, c, h, w)


def random_flip(x: torch.Tensor, gen: torch.Generator | None = None, p: float = 0.5) -> torch.Tensor:
    """Flip each image horizontally with probability ``p``."""
    _check_batch(x, "random_flip")
    if not 0.0 <= p <= 1.0:
        raise MixbitsError(f"random_flip probability must be in [0, 1], got {p!r}.")
    flip = torch.rand(x.shape[0], generator=gen) < p
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 pixels to float32 ``(x / 255 - mean) / std``, per channel."""
    _check_batch(x, "normalize")
    channels = x.shape[1]
    if len(mean) != channels or len(std) != channels:
        raise MixbitsError(f"normalize needs one mean and std per channel ({channels}), got mean={tuple(mean)} "
                           f"std={tuple(std)}.")
    if any(s <= 0 for s in std):
        raise MixbitsError(f"normalize std values must be positive, got {tuple(std)}.")
    # (x / 255 - mean) / std folded into one multiply and one add per pixel.
    scale = torch.tensor([1.0 / (255.0 * s) for s in std], dtype=torch.float32).view(1, channels, 1, 1)
    shift = torch.tensor([-m / s for m, s in zip(mean, std, strict=True)], dtype=torch.float32).view(1, channels, 1, 1)
    return x.to(torch.float32).mul_(scale).add_(shift)
