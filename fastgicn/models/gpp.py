"""GPP (paper 3.1.3): global pyramid pooling on Res-5, concatenated with Res-5 itself.

For a map of side S the pools have kernel = stride = base * (1, 2, 3, 6) with base = S // 6; at the paper's
64 x 64 Res-5 that is 10, 20, 30, 60, giving 6x6, 3x3, 2x2 and 1x1 bins (the pools cover the top-left
floor(S / kernel) * kernel pixels, as a kernel = stride average pool does). Each pooled map goes through a 1x1
convolution (+BN+ReLU) to `branch_channels` and is upsampled bilinearly (align_corners=False) back to S x S.
Output: concat(res5, pool_1, pool_2, pool_3, pool_6), in that order.

The pools are fixed-kernel average pools, never adaptive ones, so the ONNX graph holds only standard ops. This
module is the reference the Triton kernel in `kernels/gpp.py` is checked against.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .layers import ConvBNReLU

POOL_MULTIPLES = (1, 2, 3, 6)


def pool_kernels(side: int) -> tuple[int, ...]:
    """Kernel (= stride) of each pyramid level for a square-ish map whose shorter side is `side`."""
    if side < 6:
        raise ConfigError(f"GPP needs a Res-5 map of at least 6 x 6 pixels, got side {side}: "
                          "use an input of at least 48 x 48 (the paper's 512 x 512 gives 64 x 64)")
    base = side // 6
    return tuple(base * m for m in POOL_MULTIPLES)


class GPP(nn.Module):
    def __init__(self, c_in: int, branch_channels: int = 512):
        super().__init__()
        self.branches = nn.ModuleList(ConvBNReLU(c_in, branch_channels, 1) for _ in POOL_MULTIPLES)

    @property
    def in_channels(self) -> int:
        return self.branches[0][0].in_channels

    @property
    def out_channels(self) -> int:
        return self.in_channels + len(self.branches) * self.branches[0][0].out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        outs = [x]
        for kernel, branch in zip(pool_kernels(min(h, w)), self.branches):
            pooled = F.avg_pool2d(x, kernel_size=kernel, stride=kernel)
            outs.append(F.interpolate(branch(pooled), size=(h, w), mode="bilinear", align_corners=False))
        return torch.cat(outs, dim=1)
