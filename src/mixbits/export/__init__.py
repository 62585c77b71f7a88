"""Export a quantized model: QDQ ONNX, packed integer weights, and measured latency tables.

The packed format needs only numpy; ONNX export and latency tables need ``onnx`` and
``onnxruntime`` (``pip install 'mixbits[export]'``) and are imported on first use.
"""

from __future__ import annotations

from .packing import PackReport, load_packed, pack_bits, pack_model, packed_size, read_packed, unpack_bits

_ONNX_NAMES = {"ExportReport": "onnx_export", "check_onnx": "check", "export_onnx": "onnx_export",
               "measure_latency_table": "latency"}


def __getattr__(name: str):
    if name not in _ONNX_NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    from ..errors import MixbitsError

    try:
        module = importlib.import_module(f".{_ONNX_NAMES[name]}", __name__)
    except ImportError as e:
        raise MixbitsError(f"{name} needs onnx and onnxruntime ({e}); install them with "
                           "pip install 'mixbits[export]'") from None
    return getattr(module, name)


__all__ = ["ExportReport", "PackReport", "check_onnx", "export_onnx", "load_packed", "measure_latency_table",
           "pack_bits", "pack_model", "packed_size", "read_packed", "unpack_bits"]
