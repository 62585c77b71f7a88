"""Turn a float model into a quantized one by swapping modules by name, and drive it with a policy.

No tracing: any ``nn.Module`` works, whatever its forward does, because only the named layers of the
space (convolutions, linear layers, embeddings: ``layer_types.QUANTIZABLE``) are replaced (torchao's
``quantize_`` and Brevitas work the same way).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from ..data.batches import call_model, first_input, to_device
from ..errors import MixbitsError, did_you_mean
from ..layer_types import QUANTIZABLE, SUPPORTED, kept_float
from ..space import Policy, SearchSpace
from .batchnorm import two_rounding_batchnorms
from .conv_nd import QConv1d, QConv3d, QConvTranspose1d, QConvTranspose2d
from .embedding import QEmbedding
from .layers import QConv2d, QLinear, QuantLayer

# float layer type -> its quantized counterpart (exact types: a subclass may compute something else)
QUANTIZED = {nn.Conv1d: QConv1d, nn.Conv2d: QConv2d, nn.Conv3d: QConv3d, nn.ConvTranspose1d: QConvTranspose1d,
             nn.ConvTranspose2d: QConvTranspose2d, nn.Linear: QLinear, nn.Embedding: QEmbedding}


def quantize_model(model: nn.Module, space: SearchSpace, per_channel: bool = False, inplace: bool = False) -> nn.Module:
    """Replace every layer of ``space`` by its quantized counterpart, keeping module names.

    Searchable layers get the space's candidate bit-widths and start at the largest; fixed layers
    (default: first and last) get their single fixed (w, a); BatchNorms get the inference of
    ``batchnorm.py`` (the same function, rounded as the exported graph rounds it). Returns the
    quantized model (a copy unless ``inplace``). Call ``calibrate`` on one batch before training or
    evaluation.
    """
    if not inplace:
        model = copy.deepcopy(model)
    modules = dict(model.named_modules())
    for name in space.layers:
        if name not in modules:
            raise MixbitsError(f"layer {name!r} of the search space is not in {type(model).__name__}."
                               f"{did_you_mean(name, modules)} Build the space from this model.")
        w_bits, a_bits = space.candidates(name)
        qlayer = quantized_class(modules[name]).from_float(modules[name], w_bits, a_bits, per_channel)
        _set_submodule(model, name, qlayer)
    two_rounding_batchnorms(model)  # so that exported graphs reproduce inference to the bit
    warn_unquantizable(model, space.layers)
    return model


def warn_unquantizable(model: nn.Module, quantized) -> None:
    """Warn about the weight-bearing layers mixbits cannot quantize (recurrent layers, a packed attention, ...):
    they run in float and every cost counts them at 32 bits. Quantizable layers left out of the space on
    purpose (``exclude=``) are not repeated here; the cost table and the export report list them all."""
    modules = dict(model.named_modules())
    names = [n for n in kept_float(model, quantized) if not isinstance(modules[n], QUANTIZABLE)]
    if names:
        described = ", ".join(f"{n} ({type(modules[n]).__name__})" for n in names)
        warnings.warn(f"{len(names)} layer(s) with weights stay float, counted at 32 bits in BitOPs and size: "
                      f"{described}; mixbits quantizes {SUPPORTED}", stacklevel=3)


def quantized_class(module: nn.Module) -> type[QuantLayer]:
    """The quantized counterpart of a float layer, or a MixbitsError naming what is supported."""
    if isinstance(module, QuantLayer):
        raise MixbitsError(f"{type(module).__name__} is already quantized")
    if type(module) in QUANTIZED:
        return QUANTIZED[type(module)]
    raise MixbitsError(f"cannot quantize {type(module).__name__}; supported: {SUPPORTED} (exactly these types: a "
                       "subclass may compute something else). Leave it out of the space with exclude=")


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def quant_layers(model: nn.Module) -> dict[str, QuantLayer]:
    """Name -> quantized layer, in registration order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLayer)}


def require_quantized(model: nn.Module) -> dict[str, QuantLayer]:
    layers = quant_layers(model)
    if not layers:
        raise MixbitsError(f"{type(model).__name__} has no quantized layer; call quantize_model(model, space) first")
    return layers


def apply_policy(model: nn.Module, policy: Policy) -> nn.Module:
    """Set every quantized layer to the policy's fixed bits (validated against the layers' candidates)."""
    layers = require_quantized(model)
    missing = [n for n in layers if n not in policy.bits]
    unknown = [n for n in policy.bits if n not in layers]
    if missing or unknown:
        raise MixbitsError(f"policy does not match the model: layers without bits {missing}, unknown layers {unknown}")
    for name, layer in layers.items():
        layer.set_bits(*policy[name])
    return model


def current_policy(model: nn.Module) -> Policy:
    """The fixed bits each quantized layer is set to now."""
    return Policy({n: layer.bits for n, layer in require_quantized(model).items()})


def space_of(model: nn.Module) -> SearchSpace:
    """Rebuild the SearchSpace of a quantized model from its layers' candidates."""
    layers = require_quantized(model)
    fixed, w_all, a_all = {}, set(), set()
    for name, layer in layers.items():
        w, a = layer.candidates
        if len(w) == 1 and len(a) == 1:
            fixed[name] = (w[0], a[0])
        else:
            w_all.update(w)
            a_all.update(a)
    return SearchSpace(tuple(layers), tuple(w_all) or (8,), tuple(a_all) or (8,), fixed)


@torch.no_grad()
def calibrate(model: nn.Module, batches: Tensor | Iterable[Tensor]) -> None:
    """Initialise every candidate step of every quantizer from data (LSQ init), then leave bits as they were.

    Weights are initialised from the weights themselves; activations from the first batch given. The
    model runs once in eval mode; its training flag is restored.
    """
    layers = require_quantized(model)
    x = first_input(batches)
    for layer in layers.values():
        layer.w_quant.init_all_next = True
        layer.a_quant.init_all_next = not layer.weight_only  # an embedding's ids are not quantized
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        call_model(model, to_device(x, device))
    finally:
        model.train(was_training)
    stale = [n for n, layer in layers.items() if layer.w_quant.init_all_next]
    for name in stale:  # a layer the forward never reached: its activations stay uncalibrated
        layers[name].a_quant.init_all_next = False
        layers[name].w_quant.init_all_next = False
    if stale:
        raise MixbitsError(f"calibration never reached layers {stale}; their forward was not called")
