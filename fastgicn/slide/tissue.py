"""Tissue mask from a low-resolution view of the slide, so glass is never read at full resolution.

`tissue_mask(slide)` shrinks the slide by an integer factor (read from the pyramid level nearest
below that factor; see `Slide.downsampled`), then:

1. marks a pixel as tissue when its chroma (max - min of R, G, B: saturation without the division,
   high for both haematoxylin and eosin, near 0 for glass, dust shadows and white fat) is above an Otsu
   threshold clamped to [`min_chroma`, `max_chroma`], or when it is dark (mean of R, G, B below
   `max_dark`: pen, folds, heavily stained debris, which the paper's rule would keep too). The clamp
   keeps Otsu honest at both ends: on a slide that is nearly all glass Otsu would split the noise, and
   on one that is nearly all tissue it would split pale from dark tissue;
2. removes connected objects smaller than `min_object_l0` level-0 pixels (dust, specks);
3. fills holes smaller than `max_hole_l0` level-0 pixels (gland lumens, tears), leaving large ones
   (the glass inside a ring of tissue).

Returns a `TissueMask(mask, downsample)`: mask pixel (i, j) covers level-0 pixels
[i * downsample, (i + 1) * downsample) x [j * downsample, (j + 1) * downsample).
"""
from __future__ import annotations

from typing import NamedTuple

import cv2
import numpy as np

from ..errors import ConfigError
from .base import Slide

__all__ = ["TissueMask", "tissue_mask", "mask_from_rgb", "otsu_threshold", "mask_downsample"]


class TissueMask(NamedTuple):
    mask: np.ndarray        # bool (ceil(H / downsample), ceil(W / downsample))
    downsample: int         # level-0 pixels per mask pixel, along each axis


def otsu_threshold(values: np.ndarray) -> int:
    """Otsu's threshold of uint8 values: the t maximising the between-class variance of (<= t, > t).

    Returns 0 when the values are all equal (no split)."""
    values = np.asarray(values, np.uint8)
    # OpenCV's histogram takes a tenth of bincount's time on a 2048^2 mask; its float32 counts are exact
    # below 2^24 values
    if values.ndim == 2 and 0 < values.size < 1 << 24:
        hist = cv2.calcHist([np.ascontiguousarray(values)], [0], None, [256], [0, 256])
        hist = hist.ravel().astype(np.float64)
    else:
        hist = np.bincount(values.ravel(), minlength=256).astype(np.float64)
    total = hist.sum()
    if total == 0:
        return 0
    levels = np.arange(256, dtype=np.float64)
    w0 = np.cumsum(hist)                 # weight of class (<= t)
    w1 = total - w0
    s0 = np.cumsum(hist * levels)
    m0 = np.divide(s0, w0, out=np.zeros(256), where=w0 > 0)
    m1 = np.divide(s0[-1] - s0, w1, out=np.zeros(256), where=w1 > 0)
    between = w0 * w1 * (m0 - m1) ** 2
    return int(np.argmax(between))


def mask_downsample(dimensions: tuple[int, int], max_side: int = 2048) -> int:
    """The smallest power of two that brings the slide's longer side to at most `max_side` pixels."""
    if max_side < 1:
        raise ConfigError(f"max_side={max_side!r}: use a positive number of pixels")
    factor = 1
    while -(-max(dimensions) // factor) > max_side:
        factor *= 2
    return factor


def mask_from_rgb(rgb: np.ndarray, downsample: int = 1, *, min_chroma: int = 8, max_chroma: int = 25,
                  max_dark: int = 200, min_object_l0: int = 64 * 64,
                  max_hole_l0: int = 2048 * 2048) -> np.ndarray:
    """The tissue mask of a low-resolution RGB image whose pixels are `downsample` level-0 pixels wide
    (sizes in level-0 pixels are converted with it). See the module docstring for the steps."""
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ConfigError(f"mask_from_rgb needs a uint8 (h, w, 3) image, got {rgb.dtype} {rgb.shape}")
    if not 0 <= min_chroma <= max_chroma <= 255:
        raise ConfigError(f"min_chroma={min_chroma}, max_chroma={max_chroma}: use 0 <= min <= max <= 255")
    # per-channel views: numpy's reductions over a last axis of 3 cost ~20x more than elementwise max/min
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    chroma = np.maximum(np.maximum(r, g), b)
    chroma -= np.minimum(np.minimum(r, g), b)
    t = int(np.clip(otsu_threshold(chroma), min_chroma, max_chroma))
    mask = chroma > t
    if max_dark > 0:
        total = r.astype(np.uint16)
        total += g
        total += b
        mask |= total < 3 * max_dark
    area = float(downsample) ** 2
    # dust is small against the slide: on a slide smaller than a few dust specks (OpenSlide's 16 x 16
    # small.svs) an object of a sixteenth of the image is kept
    min_px = int(np.ceil(min(min_object_l0 / area, mask.size / 16)))
    # OpenCV's labelling gives the sizes with the labels, in a third of ndimage.label + bincount's time
    if min_px > 1 and mask.any():
        _, labels, stats, _ = cv2.connectedComponentsWithStats(mask.view(np.uint8), connectivity=8,
                                                               ltype=cv2.CV_32S)
        small = stats[:, cv2.CC_STAT_AREA] < min_px
        small[0] = False
        if small.any():
            mask[small[labels]] = False
    if max_hole_l0 > 0 and mask.any():
        # holes: the 4-connected pieces of background that do not touch the border (what
        # ndimage.binary_fill_holes fills), found with one labelling of the background
        n, labels, stats, _ = cv2.connectedComponentsWithStats((~mask).view(np.uint8), connectivity=4,
                                                               ltype=cv2.CV_32S)
        if n > 1:
            fill = stats[:, cv2.CC_STAT_AREA] <= max_hole_l0 / area
            fill[0] = False
            fill[labels[0]] = fill[labels[-1]] = fill[labels[:, 0]] = fill[labels[:, -1]] = False
            if fill.any():
                mask[fill[labels]] = True
    return mask


def tissue_mask(slide: Slide, *, downsample: int | None = None, max_side: int = 2048, **params) -> TissueMask:
    """Tissue mask of `slide` at an integer `downsample` of level 0 (default: the smallest power of two
    giving at most `max_side` pixels on the longer side). `params` go to `mask_from_rgb`."""
    if downsample is None:
        downsample = mask_downsample(slide.dimensions, max_side)
    if isinstance(downsample, bool) or not isinstance(downsample, (int, np.integer)) or downsample < 1:
        raise ConfigError(f"downsample={downsample!r}: use an integer >= 1")
    rgb = slide.downsampled(int(downsample))
    return TissueMask(mask_from_rgb(rgb, int(downsample), **params), int(downsample))
