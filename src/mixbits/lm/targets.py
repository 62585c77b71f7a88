"""Which weights of a causal LM are quantized, and the per-layer overrides (exact name or regex)."""

from __future__ import annotations

import re

from torch import nn

from ..errors import MixbitsError, did_you_mean
from .groupwise import check_bits


def output_head(model: nn.Module) -> nn.Module | None:
    """The layer producing the logits: Hugging Face's ``get_output_embeddings()``, else a module named lm_head."""
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    return head if head is not None else dict(model.named_modules()).get("lm_head")


def quantizable(model: nn.Module, head: bool = False, embeddings: bool = False) -> dict[str, nn.Module]:
    """Name -> module of the Linear layers (the head only with ``head``) and, with ``embeddings``, Embeddings.

    A weight shared by two modules (a head tied to the token embedding) is quantized once, under its first name.
    """
    lm_head = output_head(model)
    chosen, seen = {}, set()
    for name, module in model.named_modules():
        is_linear, is_embedding = isinstance(module, nn.Linear), isinstance(module, nn.Embedding)
        if not (is_linear or is_embedding) or (is_embedding and not embeddings):
            continue
        if module is lm_head and not head:
            continue
        if id(module.weight) in seen:
            continue
        seen.add(id(module.weight))
        chosen[name] = module
    if not chosen:
        raise MixbitsError(f"{type(model).__name__} has no nn.Linear layer to quantize"
                           f"{'' if embeddings else ' (embeddings=True adds nn.Embedding)'}")
    return chosen


def resolve_overrides(overrides: dict | None, names: list[str]) -> dict[str, int | None]:
    """Layer name -> fixed bits (None: kept in float) from ``{name or regex: bits}``; exact names win over regexes,
    the first matching regex wins. A key that matches no layer is an error (a typo would silently do nothing)."""
    if overrides is None:
        return {}
    if not isinstance(overrides, dict):
        raise MixbitsError(f"overrides must be a dict {{layer name or regex: bits or None}}, got {overrides!r}")
    fixed: dict[str, int | None] = {}
    for key, bits in overrides.items():
        if bits is not None:
            check_bits(bits)
        if key in names:
            fixed[key] = bits
            continue
        try:
            pattern = re.compile(key)
        except re.error as exc:
            raise MixbitsError(f"override {key!r} is neither a layer name nor a valid regex ({exc})") from None
        matched = [n for n in names if pattern.fullmatch(n)]
        if not matched:
            raise MixbitsError(f"override {key!r} matches no quantized layer{did_you_mean(key, names)}; "
                               f"layers are e.g. {', '.join(names[:4])} (regexes must match the whole name)")
        for n in matched:
            fixed.setdefault(n, bits)  # an exact key later in the dict still replaces it
    return fixed
