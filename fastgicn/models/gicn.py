"""GICN (paper Fig. 2): two separable large-kernel branches, 1xk then kx1 and kx1 then 1xk, summed.

No nonlinearity anywhere in the block; every convolution has a bias. This module is the reference the Triton
kernel in `kernels/gicn.py` is checked against.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError

MAX_K = 15


def check_kernel_size(k: int) -> int:
    if not isinstance(k, int) or isinstance(k, bool) or k < 1 or k > MAX_K or k % 2 == 0:
        raise ConfigError(f"GICN kernel size k={k!r}: use an odd integer in 1..{MAX_K} "
                          "(odd keeps the map size; the paper sweeps 1..13 and uses 7)")
    return k


class GICN(nn.Module):
    def __init__(self, c_in: int, c_out: int = 32, k: int = 7):
        super().__init__()
        self.k = check_kernel_size(k)
        p = k // 2
        self.a_row = nn.Conv2d(c_in, c_out, (1, k), padding=(0, p))   # branch A: 1xk ...
        self.a_col = nn.Conv2d(c_out, c_out, (k, 1), padding=(p, 0))  # ... then kx1
        self.b_col = nn.Conv2d(c_in, c_out, (k, 1), padding=(p, 0))   # branch B: kx1 ...
        self.b_row = nn.Conv2d(c_out, c_out, (1, k), padding=(0, p))  # ... then 1xk

    @property
    def in_channels(self) -> int:
        return self.a_row.in_channels

    @property
    def out_channels(self) -> int:
        return self.a_row.out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a_col(self.a_row(x)) + self.b_row(self.b_col(x))
