"""Packed integer weights: one ``.mxb`` file per model, each weight code stored in exactly its bit-width.

Layout (all integers little-endian)::

    magic  b"MIXBITS\\0"      8 bytes
    version                 uint32 (1)
    metadata length M       uint32
    metadata                M bytes of UTF-8 JSON: model card, policy, and where each buffer lies
    payload                 raw buffers back to back, offsets in the metadata count from here

A quantized layer contributes its weight codes bit-packed at w bits (code i fills bits
[i*w, (i+1)*w) of the stream, least significant bit first; signed codes are offset by 2^(w-1) to be
non-negative), then its weight step(s) and input step as float32. Every other tensor of the state
dict (biases, BatchNorm, float layers) is stored as float32 (integer buffers keep their dtype). No
pickle: the file is safe to read from anywhere. ``load_packed`` rebuilds a model whose outputs equal
the original's exactly.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..cost import profile, size_bits
from ..errors import MixbitsError
from ..quant import apply_policy, current_policy, integer_range, quant_layers, quantize_model
from ..quant.convert import require_quantized
from ..space import Policy, SearchSpace
from ..utils import atomic_write_bytes

MAGIC = b"MIXBITS\x00"
VERSION = 1
FORMAT = "mixbits.packed/1"
_HEADER = struct.Struct("<8sII")
_CHUNK = 1 << 20  # codes packed per step: a multiple of 8, so every chunk ends on a byte boundary


# bit packing -------------------------------------------------------------------------------------
def _check_bits(bits: int) -> int:
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not 2 <= bits <= 8:
        raise MixbitsError(f"bit-width must be an integer in 2..8, got {bits!r}")
    return int(bits)


def packed_size(numel: int, bits: int) -> int:
    """Bytes of ``numel`` codes at ``bits`` each: ceil(numel * bits / 8)."""
    return math.ceil(numel * _check_bits(bits) / 8)


def pack_bits(codes, bits: int) -> bytes:
    """Unsigned codes (each < 2^bits) -> ceil(n * bits / 8) bytes, least significant bit first."""
    bits = _check_bits(bits)
    codes = np.asarray(codes).reshape(-1)
    if codes.size and (codes.min() < 0 or codes.max() >= 1 << bits):
        raise MixbitsError(f"codes must lie in 0..{(1 << bits) - 1} for {bits} bits, got "
                           f"{codes.min()}..{codes.max()}; offset signed codes by 2^(bits-1) first")
    codes = codes.astype(np.uint8)
    if bits == 8:
        return codes.tobytes()
    shifts = np.arange(bits, dtype=np.uint8)
    parts = [np.packbits(((codes[i:i + _CHUNK, None] >> shifts) & 1).reshape(-1), bitorder="little").tobytes()
             for i in range(0, codes.size, _CHUNK)]
    return b"".join(parts)


def unpack_bits(buf: bytes, bits: int, numel: int) -> np.ndarray:
    """The inverse of ``pack_bits``: ``numel`` uint8 codes."""
    bits = _check_bits(bits)
    if len(buf) != packed_size(numel, bits):
        raise MixbitsError(f"{len(buf)} bytes cannot hold exactly {numel} codes of {bits} bits "
                           f"(expected {packed_size(numel, bits)}); the file is truncated or corrupt")
    raw = np.frombuffer(buf, dtype=np.uint8)
    if bits == 8:
        return raw.copy()
    planes = np.unpackbits(raw, count=numel * bits, bitorder="little").reshape(numel, bits)
    return (planes << np.arange(bits, dtype=np.uint8)).sum(axis=1, dtype=np.uint16).astype(np.uint8)


# writing -----------------------------------------------------------------------------------------
@dataclass
class PackReport:
    """Bytes on disk, split by what they hold, next to the size the cost model predicts."""

    path: str
    file_bytes: int
    header_bytes: int
    metadata_bytes: int
    code_bytes: int  # bit-packed weight codes: sum of ceil(numel * bits / 8)
    float_param_bytes: int  # every other parameter at 32 bits (biases, BatchNorm, float layers)
    buffer_bytes: int  # non-parameter state: BatchNorm running statistics and the like
    step_bytes: int  # quantizer step sizes
    predicted_bytes: float | None  # size_bits(stats, policy) / 8
    layers: dict[str, dict] = field(default_factory=dict)

    @property
    def param_bytes(self) -> int:
        """What the cost model counts: weight codes plus float parameters."""
        return self.code_bytes + self.float_param_bytes

    def to_dict(self) -> dict:
        return {**asdict(self), "param_bytes": self.param_bytes}


class _Payload:
    def __init__(self):
        self.parts: list[bytes] = []
        self.size = 0

    def add(self, data: bytes) -> dict:
        entry = {"offset": self.size, "nbytes": len(data)}
        self.parts.append(data)
        self.size += len(data)
        return entry

    def add_array(self, array: np.ndarray) -> dict:
        array = np.ascontiguousarray(array)
        little = array.dtype.newbyteorder("<") if array.dtype.byteorder == ">" else array.dtype
        return {"dtype": little.str, "shape": list(array.shape), **self.add(array.astype(little).tobytes())}


def _float32(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu()
    return t.float().numpy() if t.is_floating_point() else t.numpy()


def _pack_layer(name: str, layer, payload: _Payload) -> dict:
    if layer.mode != "fixed":
        raise MixbitsError(f"layer {name!r} is in {layer.mode} mode; set fixed bits with apply_policy before packing")
    w_bits, a_bits = layer.bits
    for quant, bits in ((layer.w_quant, w_bits), (layer.a_quant, a_bits)):
        if not bool(quant.initialized[quant.index(bits)]):
            raise MixbitsError(f"layer {name!r} has an uncalibrated step at {bits} bits; run calibrate(model, batch) "
                               "or train the model before packing")
    codes, step = layer.w_quant.integers(layer.weight, w_bits)
    qmin, _ = integer_range(w_bits, True)
    entry = {"w_bits": w_bits, "a_bits": a_bits, "a_signed": layer.a_quant.signed, "shape": list(codes.shape),
             "per_channel": layer.w_quant.steps.shape[1] > 1}
    entry["codes"] = payload.add(pack_bits((codes - qmin).numpy().astype(np.uint8), w_bits))
    entry["w_step"] = payload.add_array(_float32(step).reshape(-1))
    entry["a_step"] = payload.add_array(_float32(layer.a_quant.step(a_bits, 1)).reshape(-1))
    return entry


def _key(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _is_quant_state(key: str, layers) -> bool:
    """Whether a state-dict key is a quantized layer's weight or quantizer state (stored as codes instead)."""
    return any(key == _key(n, "weight") or key.startswith((_key(n, "w_quant."), _key(n, "a_quant."))) for n in layers)


def pack_model(model: nn.Module, path: str | os.PathLike, card=None, input_shape=None) -> PackReport:
    """Write ``model`` (quantized, fixed bits) to ``path`` in the packed format and report its bytes.

    ``card`` (a ModelCard) lets ``load_packed`` rebuild the model alone; without it the loader needs
    a model skeleton. The predicted size needs an input shape: the card's, or ``input_shape``.
    """
    layers = require_quantized(model)
    payload = _Payload()
    meta_layers = {name: _pack_layer(name, layer, payload) for name, layer in layers.items()}
    code_bytes = sum(e["codes"]["nbytes"] for e in meta_layers.values())
    params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    tensors, float_param_bytes, buffer_bytes = {}, 0, 0
    for key, value in model.state_dict().items():
        if _is_quant_state(key, layers):
            continue
        tensors[key] = payload.add_array(_float32(value))
        if key in params:
            float_param_bytes += tensors[key]["nbytes"]
        else:
            buffer_bytes += tensors[key]["nbytes"]
    policy = current_policy(model)
    meta = {"format": FORMAT, "card": card.to_dict() if card is not None else None, "policy": policy.to_dict(),
            "layers": meta_layers, "tensors": tensors}
    meta_bytes = json.dumps(meta, separators=(",", ":")).encode()
    data = _HEADER.pack(MAGIC, VERSION, len(meta_bytes)) + meta_bytes + b"".join(payload.parts)
    atomic_write_bytes(path, data)
    shape = input_shape if input_shape is not None else (card.example_input() if card is not None else None)
    predicted = size_bits(profile(model, shape), policy) / 8 if shape is not None else None
    step_bytes = payload.size - code_bytes - float_param_bytes - buffer_bytes
    per_layer = {n: {"numel": int(np.prod(e["shape"])), "bits": e["w_bits"], "code_bytes": e["codes"]["nbytes"]}
                 for n, e in meta_layers.items()}
    return PackReport(str(path), len(data), _HEADER.size, len(meta_bytes), code_bytes, float_param_bytes,
                      buffer_bytes, step_bytes, predicted, per_layer)


# reading -----------------------------------------------------------------------------------------
def read_packed(path: str | os.PathLike) -> tuple[dict, memoryview]:
    """(metadata, payload) of a packed file, after checking its header."""
    path = Path(path)
    if not path.is_file():
        raise MixbitsError(f"packed model {str(path)!r} does not exist; write one with `mixbits export` or pack_model")
    data = path.read_bytes()
    if len(data) < _HEADER.size or data[:8] != MAGIC:
        raise MixbitsError(f"{str(path)!r} is not a mixbits packed model (no {MAGIC!r} header)")
    _, version, meta_len = _HEADER.unpack_from(data)
    if version != VERSION:
        raise MixbitsError(f"{str(path)!r} is packed format version {version}; this mixbits reads version {VERSION}")
    if _HEADER.size + meta_len > len(data):
        raise MixbitsError(f"{str(path)!r} is truncated: its metadata runs past the end of the file")
    try:
        meta = json.loads(data[_HEADER.size:_HEADER.size + meta_len])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MixbitsError(f"{str(path)!r} has corrupt metadata: {e}") from None
    return meta, memoryview(data)[_HEADER.size + meta_len:]


def _slice(payload: memoryview, entry: dict) -> bytes:
    start, end = entry["offset"], entry["offset"] + entry["nbytes"]
    if end > len(payload):
        raise MixbitsError("packed file is truncated: a buffer runs past the end of the file")
    return bytes(payload[start:end])


def _array(payload: memoryview, entry: dict) -> torch.Tensor:
    array = np.frombuffer(_slice(payload, entry), dtype=np.dtype(entry["dtype"])).reshape(entry["shape"])
    return torch.from_numpy(array.copy())


def _skeleton(meta: dict, model: nn.Module | None) -> nn.Module:
    """The model to fill: ``model`` if given, else the card's float model; quantized to the stored policy."""
    from ..pipeline import ModelCard

    card = ModelCard.from_dict(meta["card"]) if meta.get("card") else None
    if model is None and card is None:
        raise MixbitsError("this packed file holds no model card; pass the model (float or quantized) to fill")
    model = card.float_model() if model is None else model
    policy = Policy.from_dict(meta["policy"])
    if not quant_layers(model):
        space = card.space if card is not None and card.space is not None else \
            SearchSpace(tuple(policy.bits), fixed=dict(policy.bits))
        per_channel = any(e["per_channel"] for e in meta["layers"].values())
        model = quantize_model(model, space, per_channel=per_channel, inplace=True)
    return apply_policy(model, policy)


@torch.no_grad()
def _fill_quantizer(quant, bits: int, step: torch.Tensor, signed: bool) -> None:
    """Set the step of ``bits``; other candidates are marked uncalibrated (they re-initialise from data)."""
    row = quant.index(bits)
    if step.numel() != quant.steps.shape[1]:
        raise MixbitsError(f"stored step has {step.numel()} values but the quantizer has {quant.steps.shape[1]}; "
                           "per-channel settings of the file and the model differ")
    quant.steps[row].copy_(step.reshape(-1))
    quant.initialized.zero_()
    quant.initialized[row] = True
    quant.sign_mode.fill_(int(signed))
    quant._refresh_cache()


def load_packed(path: str | os.PathLike, model: nn.Module | None = None) -> nn.Module:
    """Rebuild the quantized model of a packed file (eval mode); outputs equal the packed model's exactly."""
    meta, payload = read_packed(path)
    if meta.get("format") != FORMAT:
        raise MixbitsError(f"{str(path)!r} metadata is not {FORMAT!r}")
    model = _skeleton(meta, model)
    layers = require_quantized(model)
    state = {key: _array(payload, entry) for key, entry in meta["tensors"].items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not _is_quant_state(k, layers)]
    if missing or unexpected or set(meta["layers"]) != set(layers):
        raise MixbitsError(f"packed file does not match the model: missing {missing}, unexpected {unexpected}, "
                           f"layers {sorted(set(meta['layers']) ^ set(layers))}")
    for name, entry in meta["layers"].items():
        _fill_layer(layers[name], entry, payload)
    return model.eval()


@torch.no_grad()
def _fill_layer(layer, entry: dict, payload: memoryview) -> None:
    w_bits, shape = entry["w_bits"], entry["shape"]
    if list(layer.weight.shape) != shape:
        raise MixbitsError(f"packed weight has shape {shape} but the model's layer has {list(layer.weight.shape)}")
    numel = int(np.prod(shape))
    qmin, _ = integer_range(w_bits, True)
    codes = torch.from_numpy(unpack_bits(_slice(payload, entry["codes"]), w_bits, numel).astype(np.int32)) + qmin
    w_step, a_step = _array(payload, entry["w_step"]), _array(payload, entry["a_step"])
    _fill_quantizer(layer.w_quant, w_bits, w_step, True)
    _fill_quantizer(layer.a_quant, entry["a_bits"], a_step, entry["a_signed"])
    layer.weight.copy_(codes.reshape(shape).float() * layer.w_quant.step(w_bits, len(shape)))
