"""Export a model to ONNX (standard ops only) or to a TensorRT engine; what `fastgicn export` runs.

The ONNX graph: input ``input`` float32 N x 3 x H x W (already normalised: (x/255 - mean)/std), output ``logits``
float32 N x C x H x W; N is dynamic, H and W are fixed at export (the GPP pool kernels are derived from the tile
side, so a graph serves one tile size). For fp16 (and bf16, TensorRT 11 only) the weights and every op inside
are 16-bit and two casts keep the I/O in float32: the form TensorRT 11's strongly typed networks need, and one
ONNX Runtime can check on CPU. Normalisation statistics, model name/kwargs and a weight hash travel in the
model's metadata, so a runtime without torch can preprocess pixels (`OnnxSegmenter`).
"""
from __future__ import annotations

import io
import json
from collections import OrderedDict
import warnings
from pathlib import Path

import torch
from torch import nn

from ..errors import BackendUnavailable, ConfigError, EngineBuildError
from .base import PRECISIONS, check_precision, model_fingerprint, reference_copy

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
DEFAULT_OPSET = 17
META_PREFIX = "fastgicn."
# Ops that must never appear: pooling whose window depends on the input (what adaptive pooling exports to), and
# PyTorch fallbacks that only a PyTorch-built runtime could run.
FORBIDDEN_OPS = {"GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool", "ATen", "PythonOp"}
STANDARD_DOMAINS = {"", "ai.onnx"}
# Exported graphs by (weights hash, size, precision, opset, device type): engines built again for the same model
# in one process (auto's candidates, the bench, tests) skip the tracing, which dominates building a small model.
_EXPORT_CACHE: "OrderedDict[tuple, bytes]" = OrderedDict()
_EXPORT_CACHE_BYTES = 256 << 20


def _require_onnx():
    try:
        import onnx
    except ImportError as exc:
        raise BackendUnavailable("ONNX export needs the onnx package: pip install 'fastgicn[onnx]' "
                                 "(onnx and onnxruntime)") from exc
    return onnx


class _OnnxWrapper(nn.Module):
    """float32 in, float32 out; the network inside in the export precision."""

    def __init__(self, model: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.model = model
        self.dtype = dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dtype == torch.float32:
            return self.model(x)
        return self.model(x.to(self.dtype)).float()


def _size_pair(size) -> tuple[int, int]:
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    if h % 8 or w % 8 or min(h, w) < 48:
        raise ConfigError(f"export size {h} x {w}: sides must be multiples of 8 and at least 48 (tiles are "
                          "usually 512 x 512)")
    return int(h), int(w)


def export_onnx(model: nn.Module, path=None, *, size=512, precision: str = "fp32", opset: int = DEFAULT_OPSET,
                device=None) -> bytes:
    """Trace `model` (a copy, with the reference GICN/GPP modules) to ONNX; returns the bytes, writes `path`.

    `device`: where the tracing forward runs (default CUDA for 16-bit when there is a GPU, else CPU).
    Raises EngineBuildError if the graph holds anything but standard ONNX ops.
    """
    onnx = _require_onnx()
    check_precision(precision)
    h, w = _size_pair(size)
    dtype = PRECISIONS[precision]
    if device is None:
        device = "cuda" if precision != "fp32" and torch.cuda.is_available() else "cpu"
    ref = reference_copy(model)
    fingerprint = model_fingerprint(ref)
    key = (fingerprint, h, w, precision, opset, torch.device(device).type)
    data = _EXPORT_CACHE.get(key)
    if data is not None:
        _EXPORT_CACHE.move_to_end(key)
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_bytes(data)
        return data
    wrapper = _OnnxWrapper(ref.to(device, dtype).eval(), dtype).eval()
    example = torch.zeros(1, 3, h, w, device=device)
    buf = io.BytesIO()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # TracerWarnings for the shape checks (shapes are fixed on purpose)
            torch.onnx.export(wrapper, (example,), buf, dynamo=False, opset_version=opset,
                              input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                              do_constant_folding=True)
    except Exception as exc:
        raise EngineBuildError(f"ONNX export of {getattr(model, 'model_name', type(model).__name__)} at {h} x {w} "
                               f"{precision} failed ({type(exc).__name__}: {str(exc).splitlines()[0][:300]})") from exc
    proto = onnx.load_from_string(buf.getvalue())
    check_onnx_graph(proto)
    meta = {"model_name": getattr(model, "model_name", type(model).__name__),
            "model_kwargs": json.dumps(getattr(model, "model_kwargs", {}), sort_keys=True),
            "mean": json.dumps([float(v) for v in ref.mean]), "std": json.dumps([float(v) for v in ref.std]),
            "num_classes": str(int(ref.head.out_channels)), "precision": precision,
            "input_size": f"{h},{w}", "model_hash": fingerprint, "torch_version": torch.__version__}
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = META_PREFIX + key, value
    proto.producer_name = "fastgicn"
    # bf16 Conv is outside the ONNX schema before opset 22 (TensorRT parses it; onnx shape inference does not)
    try:
        onnx.checker.check_model(proto, full_check=precision != "bf16")
    except Exception as exc:
        raise EngineBuildError(f"exported ONNX graph fails onnx.checker: {exc}") from exc
    data = proto.SerializeToString()
    if len(data) <= _EXPORT_CACHE_BYTES // 4:
        _EXPORT_CACHE[key] = data
        while sum(len(v) for v in _EXPORT_CACHE.values()) > _EXPORT_CACHE_BYTES:
            _EXPORT_CACHE.popitem(last=False)
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return data


def check_onnx_graph(proto) -> dict[str, int]:
    """Op counts of an ONNX graph; raises EngineBuildError on non-standard ops or adaptive/global pooling."""
    counts: dict[str, int] = {}
    bad = []
    for node in proto.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
        if node.domain not in STANDARD_DOMAINS or node.op_type in FORBIDDEN_OPS:
            bad.append(f"{node.domain or 'ai.onnx'}::{node.op_type} ({node.name})")
    if bad:
        raise EngineBuildError(f"ONNX graph holds non-standard or input-dependent pooling ops: {', '.join(bad[:5])}"
                               f"{' ...' if len(bad) > 5 else ''}; the GPP must use fixed-kernel average pools "
                               "(fastgicn.models.gpp), never adaptive pooling")
    return counts


def onnx_metadata(proto) -> dict[str, str]:
    """The fastgicn.* metadata of an exported graph, prefix removed."""
    return {p.key[len(META_PREFIX):]: p.value for p in proto.metadata_props if p.key.startswith(META_PREFIX)}


def export_tensorrt(model: nn.Module, path, *, size=512, precision: str = "fp16", batch_size: int = 8,
                    max_batch_size: int | None = None, cache_dir=None, workspace_gib: float = 4.0) -> Path:
    """Build (or take from the engine cache) a TensorRT engine for `model` and write its plan to `path`."""
    from .tensorrt_backend import build_or_load_engine

    h, w = _size_pair(size)
    plan, _info = build_or_load_engine(model, size=(h, w), precision=precision, opt_batch=batch_size,
                                       max_batch=max_batch_size or batch_size, cache_dir=cache_dir,
                                       workspace_gib=workspace_gib)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(plan)
    return path


def export_checkpoint(checkpoint, out, *, fmt: str = "onnx", size: int | None = None, precision: str | None = None,
                      batch_size: int | None = None, opset: int = DEFAULT_OPSET) -> Path:
    """`fastgicn export`: the model a checkpoint describes -> ONNX file or TensorRT plan."""
    from ..checkpoint import load_checkpoint, model_from_checkpoint

    payload = load_checkpoint(checkpoint)
    model = model_from_checkpoint(payload, "cpu")
    tile = payload.get("tile_config", {}) or {}
    size = size or int(tile.get("tile_size", 512))
    batch_size = batch_size or int(tile.get("batch_size", 8))
    if fmt == "onnx":
        export_onnx(model, out, size=size, precision=precision or "fp32", opset=opset)
        return Path(out)
    if fmt == "tensorrt":
        return export_tensorrt(model, out, size=size, precision=precision or "fp16", batch_size=batch_size)
    raise ConfigError(f"export format {fmt!r}: use 'onnx' or 'tensorrt'")
