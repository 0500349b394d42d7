"""The paper's loss (eq. 1-2): L = CE + alpha * L_loc, L_loc = 0.5 - (sum y*P + k) / (sum y + sum P + 2k)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError


class GicnLoss(nn.Module):
    """Cross entropy (mean over all pixels) plus `alpha` times the soft-Dice localisation term.

    P is the softmax probability of `tumour_class`, y the ground truth (0/1). The sums of L_loc run over each
    image's pixels and L_loc is averaged over the batch. The smoothing `k` keeps an image with no tumour and no
    prediction at L_loc = 0 instead of 0/0, which is why the paper introduces it.
    """

    def __init__(self, alpha: float = 0.5, k: float = 5e-4, tumour_class: int = 1):
        super().__init__()
        if alpha < 0 or k <= 0:
            raise ConfigError(f"GicnLoss(alpha={alpha}, k={k}): use alpha >= 0 and k > 0 (paper: 0.5, 5e-4)")
        self.alpha, self.k, self.tumour_class = alpha, k, tumour_class
        self.last_terms: dict[str, float] = {}

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if logits.dim() != 4 or target.shape != (logits.shape[0], *logits.shape[2:]):
            raise ConfigError(f"GicnLoss: logits {tuple(logits.shape)} and target {tuple(target.shape)} "
                              "must be N x C x H x W and N x H x W")
        target = target.long()
        ce = F.cross_entropy(logits.float(), target)
        p = torch.softmax(logits.float(), dim=1)[:, self.tumour_class]
        y = (target == self.tumour_class).float()
        overlap = (y * p).flatten(1).sum(1)
        total = y.flatten(1).sum(1) + p.flatten(1).sum(1)
        loc = (0.5 - (overlap + self.k) / (total + 2 * self.k)).mean()
        self.last_terms = {"ce": float(ce.detach()), "loc": float(loc.detach())}
        return ce + self.alpha * loc
