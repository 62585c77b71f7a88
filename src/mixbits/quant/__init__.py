"""The shared quantization core: LSQ quantizers, quantized layers, and the module swap."""

from .attention import prepare_model
from .conv_nd import QConv1d, QConv3d, QConvTranspose1d, QConvTranspose2d
from .convert import apply_policy, calibrate, current_policy, quant_layers, quantize_model, space_of
from .embedding import QEmbedding
from .fit import STEP_INITS, fit_steps, initialize_steps, quantization_error
from .layers import QConv2d, QLinear, QuantLayer
from .lsq import fused_enabled, lsq_quantize, lsq_reference, set_fused
from .quantizer import STEP_FLOOR, LsqQuantizer, integer_range

__all__ = [
    "STEP_FLOOR", "STEP_INITS", "LsqQuantizer", "QConv1d", "QConv2d", "QConv3d", "QConvTranspose1d", "QConvTranspose2d",
    "QEmbedding", "QLinear", "QuantLayer", "apply_policy", "calibrate", "current_policy", "fit_steps",
    "fused_enabled", "initialize_steps", "integer_range", "lsq_quantize", "lsq_reference", "prepare_model",
    "quant_layers", "quantization_error", "quantize_model", "set_fused", "space_of",
]
