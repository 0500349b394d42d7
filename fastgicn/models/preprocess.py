"""uint8 NHWC pixels -> normalised float NCHW, the one conversion every backend and the trainer share.

`to_model_input(batch, mean, std, dtype)` is the reference expression `(x / 255 - mean) / std`.
`Normalize(mean, std)` computes the same values for a backend: its constants live on each device once (made on
first use, never per forward: no host-to-device copy per batch, nothing to trip a CUDA-graph capture, and the
backend holds them, so a captured graph's pointers stay valid). On CPU in float32 it runs one pass through a
256-entry table per channel (`fastgicn._preprocess`, Cython, GIL released) whose entries are the reference
expression evaluated by torch for each byte value: bit-identical to `to_model_input`, about 4x cheaper.
"""
from __future__ import annotations

import torch

from ..errors import ConfigError

try:  # the Cython table pass; the torch expression when the extension is not built
    from .._preprocess import nhwc_to_nchw_lut as _lut_pass
except ImportError:  # pragma: no cover - only without the built extension
    _lut_pass = None


def _check(batch: torch.Tensor) -> None:
    if batch.dtype == torch.uint8:
        if batch.dim() != 4 or batch.shape[-1] != 3:
            raise ConfigError(f"uint8 batch of shape {tuple(batch.shape)}: expected N x H x W x 3 (RGB)")
    elif batch.is_floating_point():
        if batch.dim() != 4 or batch.shape[1] != 3:
            raise ConfigError(f"float batch of shape {tuple(batch.shape)}: expected N x 3 x H x W in 0..1")
    else:
        raise ConfigError(f"batch dtype {batch.dtype}: use uint8 NHWC pixels or float NCHW in 0..1")


def _normalise(batch: torch.Tensor, mean_t: torch.Tensor, std_t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    x = batch.permute(0, 3, 1, 2).to(dtype) / 255.0 if batch.dtype == torch.uint8 else batch.to(dtype)
    return (x - mean_t) / std_t


def to_model_input(batch: torch.Tensor, mean, std, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 N x H x W x 3 (or float N x 3 x H x W already in 0..1) -> (x/255 - mean) / std, N x 3 x H x W.

    Runs wherever `batch` lives. `mean`/`std` given as tuples are copied to the device on every call: backends
    use `Normalize`, which keeps them there.
    """
    _check(batch)
    mean_t = torch.as_tensor(mean, dtype=dtype, device=batch.device).view(1, 3, 1, 1)
    std_t = torch.as_tensor(std, dtype=dtype, device=batch.device).view(1, 3, 1, 1)
    return _normalise(batch, mean_t, std_t, dtype)


class Normalize:
    """`to_model_input` with the constants kept on each device (and, on CPU, the one-pass table).

    `norm(batch, dtype)` -> N x 3 x H x W; `norm(batch, dtype, out=buffer)` writes into `buffer` when the
    table pass applies (CPU, uint8 in, float32 out), so a caller can reuse one input buffer.
    `constants(dtype, device)` -> (mean, std) as 1 x 3 x 1 x 1 tensors, made once and held here.
    """

    def __init__(self, mean, std):
        self.mean = tuple(float(v) for v in (mean.tolist() if isinstance(mean, torch.Tensor) else mean))
        self.std = tuple(float(v) for v in (std.tolist() if isinstance(std, torch.Tensor) else std))
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ConfigError(f"mean {self.mean} / std {self.std}: give three values each (R, G, B)")
        self._constants: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._lut = None

    def constants(self, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        key = (dtype, str(device))
        c = self._constants.get(key)
        if c is None:
            if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                raise ConfigError("Normalize: constants first needed inside a CUDA-graph capture; call "
                                  "norm.constants(dtype, device) (or one forward) before capturing")
            c = tuple(torch.tensor(v, dtype=dtype).view(1, 3, 1, 1).to(device) for v in (self.mean, self.std))
            self._constants[key] = c
        return c

    @property
    def lut(self) -> torch.Tensor:
        """3 x 256 float32: the reference expression for every byte value, per channel."""
        if self._lut is None:
            v = torch.arange(256, dtype=torch.uint8).view(1, 256, 1, 1).expand(1, 256, 1, 3)
            mean_t, std_t = self.constants(torch.float32, "cpu")
            self._lut = _normalise(v.contiguous(), mean_t, std_t, torch.float32)[0, :, :, 0].contiguous()
        return self._lut

    def __call__(self, batch: torch.Tensor, dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None
                 ) -> torch.Tensor:
        _check(batch)
        if _lut_pass is not None and batch.dtype == torch.uint8 and dtype == torch.float32 \
                and batch.device.type == "cpu":
            n, h, w, _ = batch.shape
            if out is None or tuple(out.shape) != (n, 3, h, w) or out.dtype != torch.float32 \
                    or not out.is_contiguous() or out.device.type != "cpu":
                out = torch.empty((n, 3, h, w), dtype=torch.float32)
            _lut_pass(batch.contiguous().numpy(), self.lut.numpy(), out.numpy())
            return out
        mean_t, std_t = self.constants(dtype, batch.device)
        return _normalise(batch, mean_t, std_t, dtype)
