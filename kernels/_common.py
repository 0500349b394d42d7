"""Checks and policies shared by the Triton launchers (`gicn.py`, `gpp.py`).

The launchers validate in Python and raise `ConfigError` for anything a kernel cannot compute exactly as the
reference module would; they never fall back to, or silently compute, something else.
"""
from __future__ import annotations

import functools

import torch
import triton

from fastgicn.errors import ConfigError

# Decided when `triton.jit` decorates the kernels, i.e. when this package is first imported: TRITON_INTERPRET=1
# must be set before that import for the kernels to run (slowly) on CPU tensors.
INTERPRETED = bool(triton.knobs.runtime.interpret)

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def check_input(x, name: str, in_channels: int) -> None:
    """A 4-D float tensor on a device the kernels can run on, with the module's channel count."""
    if not isinstance(x, torch.Tensor):
        raise ConfigError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ConfigError(f"{name}: expected an N x C x H x W tensor, got shape {tuple(x.shape)}")
    if x.shape[1] != in_channels:
        raise ConfigError(f"{name}: input has {x.shape[1]} channels, the module expects {in_channels}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise ConfigError(f"{name}: dtype {x.dtype} is not supported; use float32, float16 or bfloat16 "
                          "(or the reference module)")
    if INTERPRETED:
        if x.dtype == torch.bfloat16:
            raise ConfigError(f"{name}: bfloat16 needs a CUDA GPU; the Triton interpreter (TRITON_INTERPRET=1) "
                              "has no bfloat16. Use float32 or float16 on CPU")
    elif x.device.type != "cuda":
        raise ConfigError(f"{name}: tensor on {x.device}, but the Triton kernels were compiled for CUDA. Move it "
                          "to a GPU, or set TRITON_INTERPRET=1 before importing fastgicn.kernels to run them "
                          "(slowly) on CPU, or use the reference module (fastgicn.kernels.use_reference)")
    if x.numel() == 0:
        raise ConfigError(f"{name}: empty input of shape {tuple(x.shape)}")


def check_params(module: torch.nn.Module, x: torch.Tensor, name: str) -> None:
    """Weights on the input's device and dtype (the reference module would raise otherwise), no autograd."""
    for pname, p in list(module.named_parameters()) + list(module.named_buffers()):
        if not p.is_floating_point():
            continue  # e.g. BatchNorm's num_batches_tracked
        if p.device != x.device:
            raise ConfigError(f"{name}: parameter {pname} is on {p.device}, the input on {x.device}; "
                              "move the module with .to(device)")
        if p.dtype != x.dtype:
            raise ConfigError(f"{name}: parameter {pname} is {p.dtype}, the input {x.dtype}; convert the module "
                              "(e.g. .half()) as the reference module would require")
    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in module.parameters())):
        raise ConfigError(f"{name}: the Triton kernels are forward-only and autograd is recording; run inference "
                          "under torch.inference_mode() / torch.no_grad(), or train with the reference modules "
                          "(fastgicn.kernels.use_reference(model))")


def output_like(x: torch.Tensor, channels: int) -> torch.Tensor:
    """An N x channels x H x W tensor in x's dtype, device and memory format (channels-last stays so)."""
    n, _, h, w = x.shape
    fmt = torch.channels_last if is_channels_last(x) else torch.contiguous_format
    return torch.empty((n, channels, h, w), dtype=x.dtype, device=x.device, memory_format=fmt)


def is_channels_last(x: torch.Tensor) -> bool:
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def dot_precision(dtype: torch.dtype, device: torch.device, allow_tf32: bool | None = None) -> str:
    """tl.dot precision for float32 operands, following the reference (cuDNN uses TF32 when allowed).

    TF32 when torch.backends.cudnn.allow_tf32 is on (PyTorch's default for convolutions), else 3xTF32, which is
    float32-accurate. Ignored for 16-bit operands and by the interpreter (which computes in float32).
    `allow_tf32` overrides the cuDNN flag.
    """
    if dtype != torch.float32 or device.type != "cuda":
        return "ieee"
    if _capability(device.index if device.index is not None else torch.cuda.current_device()) < (8, 0):
        return "ieee"
    if allow_tf32 is None:
        allow_tf32 = torch.backends.cudnn.allow_tf32
    return "tf32" if allow_tf32 else "tf32x3"


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors to fill; a nominal 4 under the interpreter (keeps the CPU grids small)."""
    if device.type != "cuda":
        return 4
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def tensors_key(tensors) -> tuple:
    """Changes whenever one of `tensors` is replaced, moved or modified in place (packed-weight cache key).

    Tensors created under torch.inference_mode() keep no version counter: for those only replacement is seen,
    so modify such weights by assigning new tensors, not in place (load_state_dict into a model built outside
    inference mode is fine).
    """
    return tuple(None if t is None else (t.data_ptr(), None if t.is_inference() else t._version)
                 for t in tensors)


def check_grad(module_tensors, x: torch.Tensor, name: str) -> None:
    """The autograd part of check_params alone (cheap when grad mode is off), for cache hits."""
    if torch.is_grad_enabled() and (x.requires_grad or any(t is not None and t.requires_grad
                                                           for t in module_tensors)):
        raise ConfigError(f"{name}: the Triton kernels are forward-only and autograd is recording; run inference "
                          "under torch.inference_mode() / torch.no_grad(), or train with the reference modules "
                          "(fastgicn.kernels.use_reference(model))")


def check_not_exporting(name: str) -> None:
    """A traced or exported graph cannot hold a Triton launch: say how to export instead of failing deep inside."""
    if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
        raise ConfigError(f"{name}: a Triton module cannot be traced or exported; call "
                          "fastgicn.kernels.use_reference(model) first (same weights, standard ops)")
