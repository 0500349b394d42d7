"""Output-stride-8 dilated ResNet50 whose stem max-pool is a stride-2 convolution (paper 3.1.2)."""
from __future__ import annotations

import torch
from torch import nn

from .layers import ConvBNReLU, scaled

# (blocks, base planes, stride, dilation) for Res-2..Res-5. Res-4 and Res-5 keep 1/8 with dilation 2 and 4.
RESNET50_STAGES = ((3, 64, 1, 1), (4, 128, 2, 1), (6, 256, 1, 2), (3, 512, 1, 4))
EXPANSION = 4


class Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck: the stride sits on the 3x3 convolution; every 3x3 of a stage uses its dilation."""

    def __init__(self, c_in: int, planes: int, c_out: int, stride: int, dilation: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, c_out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class DilatedResNet50(nn.Module):
    """Returns (res2, res3, res4, res5) at strides 4, 8, 8, 8 with 256, 512, 1024, 2048 channels (x width)."""

    def __init__(self, width: float = 1.0):
        super().__init__()
        stem = scaled(64, width)
        # conv1 7x7/2 as in ResNet50, then a learned 3x3/2 convolution where ResNet50 has its 3x3/2 max-pool.
        self.stem = nn.Sequential(
            ConvBNReLU(3, stem, 7, stride=2, padding=3),
            ConvBNReLU(stem, stem, 3, stride=2, padding=1),
        )
        stages, c_in = [], stem
        self.out_channels: list[int] = []
        for blocks, planes, stride, dilation in RESNET50_STAGES:
            planes = scaled(planes, width)
            c_out = planes * EXPANSION
            layers = [Bottleneck(c_in, planes, c_out, stride, dilation)]
            layers += [Bottleneck(c_out, planes, c_out, 1, dilation) for _ in range(blocks - 1)]
            stages.append(nn.Sequential(*layers))
            self.out_channels.append(c_out)
            c_in = c_out
        self.res2, self.res3, self.res4, self.res5 = stages

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        res2 = self.res2(self.stem(x))
        res3 = self.res3(res2)
        res4 = self.res4(res3)
        res5 = self.res5(res4)
        return res2, res3, res4, res5
