"""Small building blocks shared by the network's parts."""
from __future__ import annotations

from torch import nn


def scaled(channels: int, width: float) -> int:
    """Channel count under the width multiplier: never below 1, so tiny test models keep every layer."""
    return max(1, int(round(channels * width)))


class ConvBNReLU(nn.Sequential):
    def __init__(self, c_in: int, c_out: int, kernel_size: int = 1, stride: int = 1, padding: int = 0,
                 dilation: int = 1):
        super().__init__(
            nn.Conv2d(c_in, c_out, kernel_size, stride=stride, padding=padding, dilation=dilation, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
        )


class DeconvBNReLU(nn.Sequential):
    """Transposed convolution that exactly doubles the side, then BN + ReLU (our choice: the paper is silent).

    3x3 uses padding 1 and output_padding 1; 2x2 uses neither. Both map S to 2S.
    """

    def __init__(self, c_in: int, c_out: int, kernel_size: int):
        if kernel_size not in (2, 3):
            raise ValueError(f"deconvolution kernel {kernel_size}: only 2 and 3 double the side exactly")
        padding = 1 if kernel_size == 3 else 0
        super().__init__(
            nn.ConvTranspose2d(c_in, c_out, kernel_size, stride=2, padding=padding, output_padding=padding,
                               bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
        )
