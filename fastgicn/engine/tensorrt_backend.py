"""TensorRT: ONNX -> engine through the official Python API, cached on disk, run on torch tensors and streams.

Build (`build_engine`): builder -> network from the ONNX parser -> builder config -> serialized engine.
- TensorRT 10.x: the fp32 ONNX graph, precision through builder flags (`BuilderFlag.FP16` / `BuilderFlag.BF16`:
  "weak typing", TensorRT picks per layer).
- TensorRT 11.x: weak typing is gone, every network is strongly typed; the precision lives in the graph, so the
  model is exported with 16-bit weights and ops and float32 I/O (`export_onnx(precision=...)`), and the network
  is created with `NetworkDefinitionCreationFlag.STRONGLY_TYPED` (still required on 10.x to opt in; accepted and
  ignored on 11.x). bf16 graphs are outside ONNX's Conv schema before opset 22; TensorRT's parser is expected to
  take them, and a refusal is reported as EngineBuildError with the way out.
- One optimisation profile on the batch dimension: min 1, opt `opt_batch`, max `max_batch`; H, W fixed.
- A timing cache per (TensorRT version, GPU) file, loaded before and saved after each build: a rebuild (new
  weights, new tile size) re-times only layers it has not seen.
- Engines are cached on disk keyed by model hash + input shape + batch profile + precision + TensorRT version +
  GPU name and compute capability (`engine_cache_key`), so a second run deserialises in about a second instead of
  rebuilding for minutes.

Run (`TensorRTBackend.forward`): the normalised input is a torch CUDA tensor (normalisation constants on the
device, made once: `Normalize`); `set_input_shape`, `set_tensor_address` for input and a torch-allocated
output, then `execute_async_v3(stream_handle)` on torch's current stream (the device runner's compute stream,
never the legacy default one when the runner drives it): no copies, no synchronisation, the same stream
ordering as the torch code around it.

NOT EXECUTED ON THE MACHINES THIS WAS WRITTEN ON: TensorRT cannot be installed there and no GPU was lent. The
pure-Python parts (cache key, error messages) are tested everywhere; the build/run path is tested by
tests/test_tensorrt.py wherever `import tensorrt` works and a GPU is present.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path

from ..errors import BackendUnavailable, ConfigError, EngineBuildError

log = logging.getLogger("fastgicn.engine.tensorrt")

CACHE_ENV = "FASTGICN_CACHE_DIR"
KEY_FORMAT = "fastgicn-trt-engine-1"
INSTALL_HINT = ("pip install 'fastgicn[tensorrt]' (the `tensorrt` wheel, 10.x or 11.x, matching your CUDA driver) "
                "on a machine with an NVIDIA GPU; or use backend='compiled' or 'onnxruntime'")


def require_tensorrt():
    """The tensorrt module, or BackendUnavailable saying what to install."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise BackendUnavailable(f"the tensorrt backend needs the TensorRT Python package, which is not "
                                 f"installed ({exc}): {INSTALL_HINT}") from exc
    except OSError as exc:  # the wheel is there but libnvinfer or the CUDA driver is not
        raise BackendUnavailable(f"the tensorrt package is installed but its libraries failed to load ({exc}): "
                                 f"check the NVIDIA driver and that the TensorRT and CUDA versions match") from exc
    return trt


def tensorrt_major(version: str) -> int:
    try:
        return int(version.split(".")[0])
    except ValueError:
        raise ConfigError(f"unrecognised TensorRT version string {version!r}") from None


def uses_strong_typing(version: str) -> bool:
    """11.x only builds strongly typed networks; 10.x gets the fp32 graph and builder precision flags."""
    return tensorrt_major(version) >= 11


def default_cache_dir() -> Path:
    base = os.environ.get(CACHE_ENV)
    return Path(base) if base else Path.home() / ".cache" / "fastgicn"


def engine_cache_key(*, model_hash: str, input_shape: tuple[int, int, int], batch_profile: tuple[int, int, int],
                     precision: str, tensorrt_version: str, gpu_name: str,
                     compute_capability: tuple[int, int]) -> tuple[str, dict]:
    """(hex digest, the fields it digests): everything that makes a serialized engine invalid when it changes.

    A TensorRT plan only runs on the TensorRT version that built it, is tuned for (and may only run on) one GPU
    model, and bakes in the weights, the C x H x W input, the batch profile and the precision.
    """
    if len(input_shape) != 3 or len(batch_profile) != 3:
        raise ConfigError(f"input_shape={input_shape!r} (C, H, W) and batch_profile={batch_profile!r} "
                          "(min, opt, max) must have three entries each")
    lo, opt, hi = batch_profile
    if not 1 <= lo <= opt <= hi:
        raise ConfigError(f"batch profile {batch_profile}: need 1 <= min <= opt <= max")
    fields = {"format": KEY_FORMAT, "model_hash": model_hash, "input_shape": [int(v) for v in input_shape],
              "batch_profile": [int(v) for v in batch_profile], "precision": precision,
              "tensorrt_version": tensorrt_version, "gpu_name": gpu_name,
              "compute_capability": [int(v) for v in compute_capability],
              "strongly_typed": uses_strong_typing(tensorrt_version)}
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:32]
    return digest, fields


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


def engine_cache_path(cache_dir: Path, key: str, fields: dict) -> Path:
    c, h, w = fields["input_shape"]
    name = f"{h}x{w}-{fields['precision']}-trt{fields['tensorrt_version']}-{key}.engine"
    return Path(cache_dir) / "tensorrt" / _safe(name)


def timing_cache_path(cache_dir: Path, tensorrt_version: str, gpu_name: str) -> Path:
    return Path(cache_dir) / "tensorrt" / _safe(f"timing-trt{tensorrt_version}-{gpu_name}.cache")


def _gpu_identity(device) -> tuple[str, tuple[int, int]]:
    import torch

    index = device.index if device.index is not None else torch.cuda.current_device()
    return torch.cuda.get_device_name(index), tuple(torch.cuda.get_device_capability(index))


def build_engine(onnx_bytes: bytes, *, precision: str, input_name: str, input_shape: tuple[int, int, int],
                 batch_profile: tuple[int, int, int], timing_cache: Path | None = None,
                 workspace_gib: float = 4.0, trt=None) -> bytes:
    """Serialized TensorRT engine (plan) for an ONNX graph with a dynamic batch dimension."""
    trt = trt or require_tensorrt()
    strong = uses_strong_typing(trt.__version__)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if strong and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_bytes):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        hint = (" TensorRT 11 parses the 16-bit graph; if bf16 Conv is refused, use precision='fp16'"
                if strong and precision == "bf16" else "")
        raise EngineBuildError(f"TensorRT {trt.__version__} could not parse the ONNX graph: {errors}.{hint}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    if not strong:  # 10.x: weak typing, TensorRT may pick fp16/bf16 kernels per layer
        if precision == "fp16":
            config.set_flag(trt.BuilderFlag.FP16)
        elif precision == "bf16":
            config.set_flag(trt.BuilderFlag.BF16)
    c, h, w = input_shape
    lo, opt, hi = batch_profile
    profile = builder.create_optimization_profile()
    profile.set_shape(input_name, (lo, c, h, w), (opt, c, h, w), (hi, c, h, w))
    config.add_optimization_profile(profile)
    cache_blob = timing_cache.read_bytes() if timing_cache is not None and timing_cache.is_file() else b""
    cache = config.create_timing_cache(cache_blob)
    config.set_timing_cache(cache, ignore_mismatch=False)
    t0 = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineBuildError(f"TensorRT {trt.__version__} failed to build the engine ({precision}, input "
                               f"{c}x{h}x{w}, batch {lo}..{hi}); see the TensorRT log above. Try a smaller "
                               "max batch or a larger workspace_gib")
    log.info("built TensorRT engine in %.1f s", time.perf_counter() - t0)
    if timing_cache is not None:
        timing_cache.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(timing_cache, bytes(memoryview(config.get_timing_cache().serialize())))
    return bytes(memoryview(plan))


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def build_or_load_engine(model, *, size: tuple[int, int], precision: str, opt_batch: int, max_batch: int,
                         device=None, cache_dir=None, workspace_gib: float = 4.0) -> tuple[bytes, dict]:
    """The plan for `model` from the disk cache, or exported + built + cached; returns (plan, info)."""
    import torch

    from .base import check_precision, model_fingerprint, reference_copy
    from .export import INPUT_NAME, export_onnx

    trt = require_tensorrt()
    check_precision(precision)
    device = torch.device(device or "cuda")
    if device.type != "cuda" or not torch.cuda.is_available():
        raise BackendUnavailable(f"the tensorrt backend needs a CUDA GPU (device={device}, "
                                 f"torch.cuda.is_available()={torch.cuda.is_available()}); use backend='onnxruntime' "
                                 "or 'torch' on CPU")
    ref = reference_copy(model)
    gpu_name, capability = _gpu_identity(device)
    h, w = size
    key, fields = engine_cache_key(model_hash=model_fingerprint(ref), input_shape=(3, h, w),
                                   batch_profile=(1, opt_batch, max_batch), precision=precision,
                                   tensorrt_version=trt.__version__, gpu_name=gpu_name,
                                   compute_capability=capability)
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    path = engine_cache_path(cache_dir, key, fields)
    info = {"cache_path": str(path), "key": key, "fields": fields, "cached": path.is_file()}
    if path.is_file():
        return path.read_bytes(), info
    strong = uses_strong_typing(trt.__version__)
    # 11.x: the precision must be in the graph; 10.x: the fp32 graph + builder flags
    onnx_bytes = export_onnx(ref, size=(h, w), precision=precision if strong else "fp32", device=device)
    t0 = time.perf_counter()
    plan = build_engine(onnx_bytes, precision=precision, input_name=INPUT_NAME, input_shape=(3, h, w),
                        batch_profile=(1, opt_batch, max_batch),
                        timing_cache=timing_cache_path(cache_dir, trt.__version__, gpu_name),
                        workspace_gib=workspace_gib, trt=trt)
    info["build_seconds"] = time.perf_counter() - t0
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, plan)
    _atomic_write(path.with_suffix(".json"), json.dumps(fields, indent=1).encode())
    return plan, info


class TensorRTBackend:
    """Engine backend (the shared interface) on TensorRT; one engine per tile size, built or loaded lazily."""

    name = "tensorrt"

    def __init__(self, model, *, precision: str = "fp16", device="cuda", batch_size: int = 8,
                 max_batch_size: int | None = None, cache_dir=None, workspace_gib: float = 4.0):
        import torch

        from .base import PRECISIONS, check_batch_size, check_precision, reference_copy, resolve_device

        trt = require_tensorrt()
        self.precision = check_precision(precision)
        self.dtype = PRECISIONS[precision]
        self.device = resolve_device(device)
        if self.device.type != "cuda":
            raise BackendUnavailable("the tensorrt backend needs a CUDA GPU; use backend='onnxruntime' or "
                                     "'torch' on CPU")
        self.batch_size = check_batch_size(batch_size)
        self.max_batch_size = max(batch_size, max_batch_size or batch_size)
        self._model = reference_copy(model).cpu()
        self.mean = tuple(float(v) for v in self._model.mean)
        self.std = tuple(float(v) for v in self._model.std)
        self.num_classes = int(self._model.head.out_channels)
        from ..models.preprocess import Normalize

        self.norm = Normalize(self.mean, self.std)  # constants on the device once, not per forward
        self.cache_dir = cache_dir
        self.workspace_gib = workspace_gib
        self._trt = trt
        self._logger = trt.Logger(trt.Logger.WARNING)  # must outlive the runtime and its engines
        self._runtime = trt.Runtime(self._logger)
        self._engines: dict[tuple[int, int], tuple] = {}
        self.build_info: dict[tuple[int, int], dict] = {}
        typing_mode = ("strongly typed network, precision in the ONNX graph" if uses_strong_typing(trt.__version__)
                       else f"builder flag {precision.upper()}" if precision != "fp32" else "fp32 (TF32 allowed)")
        self.notes = [f"TensorRT {trt.__version__}", typing_mode,
                      f"batch profile 1..{self.max_batch_size} (opt {batch_size})",
                      "execute_async_v3 on torch's current stream", "engines cached on disk"]
        self._torch = torch

    @property
    def description(self) -> str:
        return f"{self.name} ({self.precision}, {self.device})" + "".join(f"; {n}" for n in self.notes)

    def _engine(self, size: tuple[int, int]):
        entry = self._engines.get(size)
        if entry is not None:
            return entry
        trt = self._trt
        plan, info = build_or_load_engine(self._model, size=size, precision=self.precision,
                                          opt_batch=self.batch_size, max_batch=self.max_batch_size,
                                          device=self.device, cache_dir=self.cache_dir,
                                          workspace_gib=self.workspace_gib)
        with self._torch.cuda.device(self.device):
            engine = self._runtime.deserialize_cuda_engine(plan)
            if engine is None:
                raise EngineBuildError(f"TensorRT could not deserialise the cached engine {info['cache_path']}; "
                                       "delete it to rebuild")
            context = engine.create_execution_context()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(inputs) != 1 or len(outputs) != 1:
            raise EngineBuildError(f"TensorRT engine has inputs {inputs} and outputs {outputs}; expected one each")
        dtypes = {trt.DataType.FLOAT: self._torch.float32, trt.DataType.HALF: self._torch.float16,
                  trt.DataType.BF16: self._torch.bfloat16}
        in_dtype = dtypes.get(engine.get_tensor_dtype(inputs[0]))
        out_dtype = dtypes.get(engine.get_tensor_dtype(outputs[0]))
        if in_dtype is None or out_dtype is None:
            raise EngineBuildError("TensorRT engine I/O types are not float32/float16/bfloat16")
        entry = (engine, context, inputs[0], outputs[0], in_dtype, out_dtype)
        self._engines[size] = entry
        self.build_info[size] = info
        return entry

    def prepare(self, size: tuple[int, int]) -> None:
        self._engine(tuple(size))

    def forward(self, x):
        torch = self._torch

        h, w = (x.shape[1], x.shape[2]) if x.dtype == torch.uint8 else (x.shape[2], x.shape[3])
        n = x.shape[0]
        if n > self.max_batch_size:
            raise ConfigError(f"tensorrt backend: batch of {n} exceeds the engine's max batch "
                              f"{self.max_batch_size}")
        engine, context, in_name, out_name, in_dtype, out_dtype = self._engine((int(h), int(w)))
        with torch.inference_mode():
            inp = self.norm(x, in_dtype).contiguous()
        if not context.set_input_shape(in_name, tuple(inp.shape)):
            raise EngineBuildError(f"TensorRT refused input shape {tuple(inp.shape)} for {in_name}")
        out = torch.empty(tuple(context.get_tensor_shape(out_name)), dtype=out_dtype, device=self.device)
        context.set_tensor_address(in_name, inp.data_ptr())
        context.set_tensor_address(out_name, out.data_ptr())
        if not context.execute_async_v3(torch.cuda.current_stream(self.device).cuda_stream):
            raise EngineBuildError("TensorRT execute_async_v3 returned False (see the TensorRT log)")
        # `inp` was allocated on this same stream, so the caching allocator only hands its memory to work queued
        # after these kernels: dropping it here is safe without a synchronisation.
        return out

    def __repr__(self) -> str:
        return f"<TensorRTBackend {self.description}>"
