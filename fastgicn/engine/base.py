"""What every backend shares: the interface, precisions, tolerances against the reference, input checks.

A backend is built from a reference model (`fastgicn.models`, fp32, eval mode) and runs

    backend.forward(x) -> logits N x C x H x W on backend.device, in the backend's compute dtype

where `x` is a batch already on `backend.device`: uint8 N x H x W x 3 pixels (normalisation happens inside the
backend, on the device, so compiled backends can fuse it) or float N x 3 x H x W in 0..1. Backends never
chunk: the Engine hands them at most `batch_size` tiles. Each backend holds a `Normalize` (`self.norm`): its
mean/std constants are put on the device once, never rebuilt from host memory per forward. A backend runs on
torch's current CUDA stream (or exposes `compute_stream`, which the device runner then uses) and never
synchronises the host; `fastgicn.engine.runner.DeviceRunner` is the loop that drives one over a slide.
"""
from __future__ import annotations

import copy
import hashlib
import json

import torch
from torch import nn

from ..errors import BackendUnavailable, ConfigError
from ..models.network import OUTPUT_STRIDE
from ..models.preprocess import Normalize

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Relative L2 error ||out - ref|| / ||ref|| of the logits allowed against the fp32 torch reference on the same
# input (METHOD: fp32 far under 1e-3; 16-bit operands 1e-3..1e-2; a deep network with BN adds a little).
TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 5e-2}
MIN_SIDE = 48  # GPP needs a Res-5 map of at least 6 x 6 (stride 8)


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ConfigError(f"precision={precision!r}: use one of {', '.join(PRECISIONS)} (or 'auto': fp16 on a "
                          "GPU, fp32 on CPU)")
    return precision


def resolve_device(device) -> torch.device:
    """The one device check (engine, pipeline, train, bench): None -> the first CUDA GPU if there is one, else
    CPU; 'cpu', 'cuda' (the current GPU) or 'cuda:N' (N below the GPU count). Anything else -- 'gpu', 'mps',
    'cuda' without a GPU, a typo -- raises a one-line ConfigError / BackendUnavailable naming the value and the
    fix, before any model or slide is touched."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(device, str):
        device = device.strip().lower()
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        hint = " (torch names NVIDIA GPUs 'cuda')" if str(device) in ("gpu", "nvidia", "cuda0") else ""
        raise ConfigError(f"device {device!r}{hint}: use 'cpu', 'cuda' or 'cuda:N'") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise BackendUnavailable(f"device {device!r}: torch sees no CUDA GPU here (torch {torch.__version__}, "
                                     f"CUDA build: {torch.version.cuda or 'none'}): use --device cpu, or run on a "
                                     "machine with an NVIDIA driver and a CUDA build of torch")
        count = torch.cuda.device_count()
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        elif dev.index >= count:
            raise BackendUnavailable(f"device {device!r}: this machine has {count} CUDA GPU"
                                     f"{'s' if count != 1 else ''} (cuda:0..cuda:{count - 1}): use one of those")
    elif dev.type == "cpu":
        dev = torch.device("cpu")
    else:
        raise ConfigError(f"device {device!r}: fastgicn runs on 'cpu' and 'cuda' (or 'cuda:N') only; "
                          f"{dev.type} is not supported")
    return dev


def check_batch(batch: torch.Tensor) -> tuple[int, int]:
    """Validate a batch (uint8 NHWC or float NCHW) and return its (H, W)."""
    if batch.dtype == torch.uint8:
        if batch.dim() != 4 or batch.shape[-1] != 3:
            raise ConfigError(f"uint8 batch of shape {tuple(batch.shape)}: expected N x H x W x 3 RGB pixels")
        h, w = batch.shape[1], batch.shape[2]
    elif batch.is_floating_point():
        if batch.dim() != 4 or batch.shape[1] != 3:
            raise ConfigError(f"float batch of shape {tuple(batch.shape)}: expected N x 3 x H x W in 0..1")
        h, w = batch.shape[2], batch.shape[3]
    else:
        raise ConfigError(f"batch dtype {batch.dtype}: use uint8 N x H x W x 3 pixels or float N x 3 x H x W "
                          "in 0..1")
    if h % OUTPUT_STRIDE or w % OUTPUT_STRIDE or min(h, w) < MIN_SIDE:
        raise ConfigError(f"tile {h} x {w}: sides must be multiples of {OUTPUT_STRIDE} and at least {MIN_SIDE} "
                          "(the paper's tiles are 512 x 512)")
    if batch.shape[0] == 0:
        raise ConfigError("empty batch: pass at least one tile")
    return int(h), int(w)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; NaN anywhere gives inf (never passes a tolerance)."""
    out64, ref64 = out.detach().double().cpu(), ref.detach().double().cpu()
    if out64.shape != ref64.shape:
        raise ConfigError(f"output shape {tuple(out64.shape)} differs from the reference {tuple(ref64.shape)}")
    if not torch.isfinite(out64).all():
        return float("inf")
    return float((out64 - ref64).norm() / ref64.norm().clamp_min(1e-30))


def reference_copy(model: nn.Module) -> nn.Module:
    """A private fp32 eval copy of `model` with the reference GICN/GPP modules (Triton ones swapped back)."""
    model_copy = copy.deepcopy(model).eval()
    if _has_triton_modules(model_copy):
        from fastgicn.kernels import use_reference  # only reachable when the kernels were imported already
        model_copy = use_reference(model_copy)
    for name in ("mean", "std", "model_name", "model_kwargs"):
        if hasattr(model, name):
            setattr(model_copy, name, copy.deepcopy(getattr(model, name)))
    return model_copy.float()


def _has_triton_modules(model: nn.Module) -> bool:
    return any(type(m).__name__ in ("TritonGICN", "TritonGPP") for m in model.modules())


def model_fingerprint(model: nn.Module) -> str:
    """sha256 of the architecture (name, kwargs, normalisation) and every weight: the model part of cache keys."""
    h = hashlib.sha256()
    meta = {"model_name": getattr(model, "model_name", type(model).__name__),
            "model_kwargs": getattr(model, "model_kwargs", {}),
            "mean": list(getattr(model, "mean", ())), "std": list(getattr(model, "std", ()))}
    h.update(json.dumps(meta, sort_keys=True, default=str).encode())
    for key, value in sorted(model.state_dict().items()):
        h.update(key.encode())
        t = value.detach().to("cpu")
        if t.is_floating_point():
            t = t.float()
        h.update(str(tuple(t.shape)).encode())
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()


def check_batch_size(batch_size) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size={batch_size!r}: use a positive integer")
    return batch_size


class Backend:
    """The interface shared by all backends (see the module docstring)."""

    name = "base"

    def __init__(self, model: nn.Module, *, precision: str, device: torch.device, batch_size: int):
        self.precision = check_precision(precision)
        self.dtype = PRECISIONS[precision]
        self.device = torch.device(device)
        self.batch_size = check_batch_size(batch_size)
        self.mean = tuple(float(v) for v in model.mean)
        self.std = tuple(float(v) for v in model.std)
        self.num_classes = int(model.head.out_channels)
        self.norm = Normalize(self.mean, self.std)  # constants on the device, made once (not per forward)
        self.notes: list[str] = []

    @property
    def description(self) -> str:
        """One line: what runs, in which precision, with which optimisations (and what was left out, why)."""
        return f"{self.name} ({self.precision}, {self.device})" + "".join(f"; {n}" for n in self.notes)

    def prepare(self, size: tuple[int, int]) -> None:
        """Build whatever a tile size needs (export, compile, engine, CUDA graphs) before timing or serving."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.description}>"
