"""ResNet50-GICN-GPP (paper Fig. 1) and its Table 1 ablations, as one configurable module."""
from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError
from .backbone import DilatedResNet50
from .gicn import GICN, check_kernel_size
from .gpp import GPP, pool_kernels
from .layers import ConvBNReLU, DeconvBNReLU, scaled

OUTPUT_STRIDE = 8
# ImageNet statistics on 0..1 RGB: the usual choice when nothing better is known; stored in every checkpoint.
DEFAULT_MEAN = (0.485, 0.456, 0.406)
DEFAULT_STD = (0.229, 0.224, 0.225)


class GicnDecoder(nn.Module):
    """Multi-level pyramid (paper 3.1.2): GICN-2+3+4 at 1/8 -> Deconv-1 -> +GICN-1 -> Deconv-2 -> Deconv-3."""

    def __init__(self, in_channels: list[int], channels: int, k: int):
        super().__init__()
        self.gicn1, self.gicn2, self.gicn3, self.gicn4 = (GICN(c, channels, k) for c in in_channels)
        self.deconv1 = DeconvBNReLU(channels, channels, 3)
        self.deconv2 = DeconvBNReLU(channels, channels, 3)
        self.deconv3 = DeconvBNReLU(channels, channels, 2)
        self.out_channels = channels

    def forward(self, res2, res3, res4, res5) -> torch.Tensor:
        x = self.deconv1(self.gicn2(res3) + self.gicn3(res4) + self.gicn4(res5))
        x = self.deconv2(x + self.gicn1(res2))
        return self.deconv3(x)


class GppBranch(nn.Module):
    """Multi-scale pyramid (paper 3.1.3): GPP, 1x1 reduction of the concat, three 3x3/2 deconvolutions."""

    def __init__(self, c_in: int, branch_channels: int, reduce_channels: int, up_channels: tuple[int, int, int]):
        super().__init__()
        self.gpp = GPP(c_in, branch_channels)
        self.reduce = ConvBNReLU(self.gpp.out_channels, reduce_channels, 1)
        c1, c2, c3 = up_channels
        self.up = nn.Sequential(DeconvBNReLU(reduce_channels, c1, 3), DeconvBNReLU(c1, c2, 3),
                                DeconvBNReLU(c2, c3, 3))
        self.out_channels = c3

    def forward(self, res5: torch.Tensor) -> torch.Tensor:
        return self.up(self.reduce(self.gpp(res5)))


class ResNet50GicnGpp(nn.Module):
    """Logits N x num_classes x H x W for a normalised float input N x 3 x H x W (H, W multiples of 8)."""

    def __init__(self, num_classes: int = 2, k: int = 7, width: float = 1.0, use_gicn: bool = True,
                 use_gpp: bool = True):
        super().__init__()
        if not use_gicn and not use_gpp:
            raise ConfigError("a model needs the GICN decoder, the GPP branch, or both")
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ConfigError(f"num_classes={num_classes!r}: use at least 2 (normal, tumour)")
        if not width > 0:
            raise ConfigError(f"width={width!r}: use a positive channel multiplier (1.0 is the paper's network)")
        check_kernel_size(k)
        self.k, self.width, self.num_classes = k, width, num_classes
        self.mean, self.std = DEFAULT_MEAN, DEFAULT_STD
        self.backbone = DilatedResNet50(width)
        head_in = 0
        self.decoder = None
        if use_gicn:
            self.decoder = GicnDecoder(self.backbone.out_channels, scaled(32, width), k)
            head_in += self.decoder.out_channels
        self.gpp_branch = None
        if use_gpp:
            self.gpp_branch = GppBranch(self.backbone.out_channels[3], scaled(512, width), scaled(512, width),
                                        (scaled(128, width), scaled(64, width), scaled(64, width)))
            head_in += self.gpp_branch.out_channels
        self.head = nn.Conv2d(head_in, num_classes, 1)

    def check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ConfigError(f"input of shape {tuple(x.shape)}: expected N x 3 x H x W")
        h, w = x.shape[-2:]
        if h % OUTPUT_STRIDE or w % OUTPUT_STRIDE:
            raise ConfigError(f"input side {h} x {w}: use multiples of {OUTPUT_STRIDE} (512 is the paper's)")
        if self.gpp_branch is not None:
            pool_kernels(min(h, w) // OUTPUT_STRIDE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        res2, res3, res4, res5 = self.backbone(x)
        parts = []
        if self.decoder is not None:
            parts.append(self.decoder(res2, res3, res4, res5))
        if self.gpp_branch is not None:
            parts.append(self.gpp_branch(res5))
        return self.head(parts[0] if len(parts) == 1 else torch.cat(parts, dim=1))
