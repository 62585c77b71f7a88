"""Each layer's error at each bit-width, measured once on calibration batches and saved for reuse.

Two scores:
- ``kl`` (default): the mean per-token KL divergence of the model's next-token distribution from the float
  model's, with only that layer quantized. It is in the loss's own unit, so scores of different layers add
  up comparably (the integer program minimises their sum); it costs layers × bit-widths forward passes.
- ``output``: the layer's own output error ``Σ‖X(Ŵ−W)ᵀ‖² / Σ‖XWᵀ‖²`` on its calibration inputs; one forward
  pass, but relative errors of different layers are not in a common unit.

A measurement is keyed by a hash of the model's weights, the calibration tokens and the settings; with a
``cache_dir`` it is written to ``<cache_dir>/<key>.json`` and read back by any later call with the same key.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .evaluate import logits_of, run_with_hooks
from .groupwise import GroupFormat, quantize

SCORES = ("kl", "output")


@dataclass
class Measurement:
    key: str
    settings: dict
    errors: dict[str, dict[int, float]]  # layer -> bits -> score
    seconds: float

    def save(self, path: Path) -> None:
        data = asdict(self) | {"errors": {n: {str(b): e for b, e in per.items()} for n, per in self.errors.items()}}
        path.write_text(json.dumps(data, indent=1) + "\n")

    @classmethod
    def load(cls, path: Path) -> Measurement:
        data = json.loads(path.read_text())
        data["errors"] = {n: {int(b): e for b, e in per.items()} for n, per in data["errors"].items()}
        return cls(**data)


def measurement_key(model: nn.Module, batches: list[torch.Tensor], settings: dict) -> str:
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    for ids in batches:
        digest.update(ids.cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:24]


def measure(model: nn.Module, layers: dict[str, nn.Module], batches: list[torch.Tensor], bits: tuple[int, ...],
            fmt: GroupFormat, quantizer: str, score: str = "kl", cache_dir: str | Path | None = None,
            hessians: dict | None = None) -> Measurement:
    """Score every layer in ``layers`` at every bit-width, or read the saved measurement with the same key.
    ``hessians`` (layer -> input Hessian) are what the 'gptq' quantizer needs."""
    settings = {"bits": list(bits), "group_size": fmt.group_size, "scale_bits": fmt.scale_bits,
                "integer_zero": fmt.integer_zero, "quantizer": quantizer, "score": score, "layers": list(layers)}
    key = measurement_key(model, batches, settings)
    path = Path(cache_dir) / f"{key}.json" if cache_dir is not None else None
    if path is not None and path.exists():
        return Measurement.load(path)
    start = time.perf_counter()
    run = _kl_errors if score == "kl" else _output_errors
    hessians = hessians or {}

    def quantized(name: str, weight: torch.Tensor, b: int) -> torch.Tensor:
        return quantize(weight, b, fmt, quantizer, hessians.get(name)).dequantize().to(weight.dtype)

    errors = run(model, layers, batches, bits, quantized)
    result = Measurement(key, settings, errors, round(time.perf_counter() - start, 3))
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        result.save(path)
    return result


@torch.no_grad()
def _kl_errors(model, layers, batches, bits, quantized):
    reference = [F.log_softmax(logits_of(model(ids)).float(), -1) for ids in batches]

    def divergence() -> float:
        total = 0.0
        for ids, ref in zip(batches, reference, strict=True):
            logp = F.log_softmax(logits_of(model(ids)).float(), -1)
            total += float(F.kl_div(logp, ref, log_target=True, reduction="sum")) / ref[..., 0].numel()
        return total / len(batches)

    errors = {}
    for name, module in layers.items():
        original = module.weight.data.clone()
        errors[name] = {}
        for b in bits:
            module.weight.data = quantized(name, original, b)
            errors[name][b] = divergence()
        module.weight.data = original
    return errors


@torch.no_grad()
def _output_errors(model, layers, batches, bits, quantized):
    inputs: dict[str, list[torch.Tensor]] = {n: [] for n in layers}

    def keep(name):
        return lambda module, args, out: inputs[name].append(args[0].detach())

    run_with_hooks(model, {m: keep(n) for n, m in layers.items()}, batches)
    errors = {}
    for name, module in layers.items():
        w = module.weight.detach().float()
        errors[name] = {}
        for b in bits:
            delta = quantized(name, w, b) - w
            num = sum(float(_apply(module, x, delta).pow(2).sum()) for x in inputs[name])
            den = sum(float(_apply(module, x, w).pow(2).sum()) for x in inputs[name])
            errors[name][b] = num / max(den, 1e-30)
    return errors


def _apply(module: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The layer's bias-free output with ``weight``: a lookup for embeddings, a product for linear layers."""
    return F.embedding(x, weight) if isinstance(module, nn.Embedding) else x.float() @ weight.T
