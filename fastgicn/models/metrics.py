"""Dice (paper eq. 3) and the Table 4 split of Dice over small (XS) and large (XL) tumour regions."""
from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

from ..errors import ConfigError

# Table 4: connected tumour regions under 50,000 pixels are small targets (XS), the rest large (XL).
SMALL_REGION_PIXELS = 50_000


def _as_bool(mask):
    if isinstance(mask, torch.Tensor):
        return mask.bool()
    return np.asarray(mask).astype(bool)


def dice_score(pred, target) -> float:
    """2|X and Y| / (|X| + |Y|) over binary masks (NumPy or torch, any shape); 1.0 when both are empty."""
    pred, target = _as_bool(pred), _as_bool(target)
    if tuple(pred.shape) != tuple(target.shape):
        raise ConfigError(f"dice_score: prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    inter = int((pred & target).sum())
    total = int(pred.sum()) + int(target.sum())
    return 1.0 if total == 0 else 2.0 * inter / total


def _to_numpy_bool(mask) -> np.ndarray:
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().numpy()
    return np.asarray(mask).astype(bool)


def dice_by_size(pred, target, small_pixels: int = SMALL_REGION_PIXELS) -> dict:
    """Dice overall and over small (XS) and large (XL) tumour regions of one 2-D mask pair.

    Ground-truth regions are 8-connected components: small when under `small_pixels`. A predicted component is
    judged with the ground-truth region it overlaps most; one that overlaps none (a false positive) is judged
    by its own size. XS Dice compares the small truth regions with the predictions judged small; XL likewise.
    A split with neither truth nor prediction scores 1.0 and has a count of 0.
    """
    pred, target = _to_numpy_bool(pred), _to_numpy_bool(target)
    if pred.shape != target.shape or pred.ndim != 2:
        raise ConfigError(f"dice_by_size: needs two 2-D masks of one shape, got {pred.shape} and {target.shape}")
    eight = np.ones((3, 3), bool)
    truth_labels, n_truth = ndimage.label(target, structure=eight)
    truth_sizes = np.bincount(truth_labels.ravel(), minlength=n_truth + 1)
    truth_small = truth_sizes < small_pixels  # index 0 (background) is never used below
    small_truth = truth_small[truth_labels] & target

    pred_labels, n_pred = ndimage.label(pred, structure=eight)
    pred_small = np.zeros(n_pred + 1, bool)
    if n_pred:
        # For each predicted component, the truth label it overlaps most (0 = overlaps none).
        pairs = pred_labels.astype(np.int64) * (n_truth + 1) + truth_labels
        counts = np.bincount(pairs[pred].ravel(), minlength=(n_pred + 1) * (n_truth + 1))
        counts = counts.reshape(n_pred + 1, n_truth + 1)
        counts_fg = counts[:, 1:]
        best = np.where(counts_fg.max(1) > 0, counts_fg.argmax(1) + 1, 0)
        own_size = counts.sum(1)
        pred_small = np.where(best > 0, truth_small[best], own_size < small_pixels)
    small_pred = pred_small[pred_labels] & pred
    return {
        "dice": dice_score(pred, target),
        "dice_small": dice_score(small_pred, small_truth),
        "dice_large": dice_score(pred & ~small_pred, target & ~small_truth),
        "regions_small": int(truth_small[1:].sum()),
        "regions_large": int((~truth_small[1:]).sum()),
    }
