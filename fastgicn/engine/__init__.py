"""Inference engine: `Engine` and one module per backend (torch, compiled, onnxruntime, tensorrt).

    from fastgicn.engine import Engine
    engine = Engine("last.pt", backend="auto", precision="fp16", batch_size=16)
    labels = engine.predict(tiles, output="labels")

Names are imported lazily, so `fastgicn.engine.onnxruntime_backend.OnnxSegmenter` (the torch-free runtime)
can be used on a machine without torch.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "Engine": ".engine", "BACKENDS": ".engine", "OUTPUTS": ".engine", "AUTO_ORDER": ".engine",
    "create_backend": ".engine",
    "PRECISIONS": ".base", "TOLERANCE": ".base", "Backend": ".base", "relative_error": ".base",
    "model_fingerprint": ".base",
    "DeviceRunner": ".runner", "tumour_probability_u8": ".runner",
    "TileStream": ".streaming", "MaskRegion": ".streaming",
    "export_onnx": ".export", "export_tensorrt": ".export", "export_checkpoint": ".export",
    "check_onnx_graph": ".export",
    "TorchBackend": ".torch_backend", "CompiledBackend": ".compiled",
    "OnnxRuntimeBackend": ".onnxruntime_backend", "OnnxSegmenter": ".onnxruntime_backend",
    "TensorRTBackend": ".tensorrt_backend",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'fastgicn.engine' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
