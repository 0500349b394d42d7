"""uint8 NHWC pixels -> normalised float NCHW, the one conversion every backend and the trainer share."""
from __future__ import annotations

import torch

from ..errors import ConfigError


def to_model_input(batch: torch.Tensor, mean, std, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 N x H x W x 3 (or float N x 3 x H x W already in 0..1) -> (x/255 - mean) / std, N x 3 x H x W.

    Runs wherever `batch` lives (on the GPU in the engine, after the host-to-device copy).
    """
    if batch.dtype == torch.uint8:
        if batch.dim() != 4 or batch.shape[-1] != 3:
            raise ConfigError(f"uint8 batch of shape {tuple(batch.shape)}: expected N x H x W x 3 (RGB)")
        x = batch.permute(0, 3, 1, 2).to(dtype) / 255.0
    elif batch.is_floating_point():
        if batch.dim() != 4 or batch.shape[1] != 3:
            raise ConfigError(f"float batch of shape {tuple(batch.shape)}: expected N x 3 x H x W in 0..1")
        x = batch.to(dtype)
    else:
        raise ConfigError(f"batch dtype {batch.dtype}: use uint8 NHWC pixels or float NCHW in 0..1")
    mean_t = torch.as_tensor(mean, dtype=dtype, device=x.device).view(1, 3, 1, 1)
    std_t = torch.as_tensor(std, dtype=dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean_t) / std_t
