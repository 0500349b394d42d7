"""The overlay PNG: the slide's thumbnail tinted where the mask says tumour, tumour outlines drawn solid."""
from __future__ import annotations

from pathlib import Path

import cv2
import imagecodecs
import numpy as np

from ..errors import ConfigError
from .atomic import atomic_path
from .geojson import TUMOR_COLOR

OVERLAY_PNG_LEVEL = 1  # zlib level of the overlay PNG
OVERLAY_PNG_STRATEGY = 3  # zlib's Z_RLE
OVERLAY_PNG_FILTER = 16  # PNG_FILTER_SUB

__all__ = ["overlay_image", "write_overlay_png", "write_slide_overlay", "block_majority"]


def overlay_image(thumbnail: np.ndarray, mask: np.ndarray, color=TUMOR_COLOR, alpha: float = 0.45) -> np.ndarray:
    """The thumbnail (h, w, 3) tinted with `color` where `mask` is set, tumour outlines drawn solid.
    Integer arithmetic, a band of rows at a time (temporaries stay small for large thumbnails)."""
    if thumbnail.shape[:2] != mask.shape:
        raise ConfigError(f"thumbnail {thumbnail.shape[:2]} and mask {mask.shape} differ in size")
    mask = mask.astype(bool)
    out = np.array(thumbnail[..., :3], np.uint8, copy=True)
    if not mask.any():  # no tumour: the thumbnail as it is
        return out
    a = int(round(alpha * 256))
    c = np.asarray(color, np.uint16) * a + 128
    # the tint of each byte value, per channel, as a table: OpenCV's LUT and masked copies instead of NumPy's
    # fancy indexing (a fifth of the time on a fragmented 2048^2 overlay)
    v = np.arange(256, dtype=np.uint16)[:, None]
    lut = ((v * (256 - a) + c) >> 8).astype(np.uint8).reshape(256, 1, 3)
    # the outline: mask pixels with a 4-neighbour outside the mask (or the image)
    m8 = mask.view(np.uint8)
    inner = cv2.erode(m8, cv2.getStructuringElement(cv2.MORPH_CROSS, (3, 3)), borderType=cv2.BORDER_CONSTANT,
                      borderValue=0)
    edge = (m8 > inner).view(np.uint8)
    solid = np.empty((min(256, len(out)),) + out.shape[1:], np.uint8)
    solid[...] = np.asarray(color, np.uint8)
    for r in range(0, len(out), 256):  # a band at a time: temporaries stay small
        band = out[r:r + 256]
        cv2.copyTo(cv2.LUT(band, lut), m8[r:r + 256], band)
        cv2.copyTo(solid[:len(band)], edge[r:r + 256], band)
    return out


def write_overlay_png(path, thumbnail: np.ndarray, mask: np.ndarray, max_side: int = 2048) -> Path:
    """Overlay of the mask on the thumbnail as a PNG, shrunk so its long side is at most `max_side`."""
    from PIL import Image

    img = Image.fromarray(overlay_image(thumbnail, mask))
    if max(img.size) > max_side:
        s = max_side / max(img.size)
        img = img.resize((max(1, round(img.size[0] * s)), max(1, round(img.size[1] * s))), Image.LANCZOS)
    path = Path(path)
    # libpng's fast settings (OpenCV's): zlib level 1, run-length strategy, the Sub filter only: a fifth of
    # PIL's level-1 time on a 2048^2 thumbnail for a file about a quarter larger; the pixels are the same
    data = imagecodecs.png_encode(np.asarray(img), level=OVERLAY_PNG_LEVEL, strategy=OVERLAY_PNG_STRATEGY,
                                  filter=OVERLAY_PNG_FILTER)
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(data)
    return path


def write_slide_overlay(path, slide, low: np.ndarray, low_factor: int, level_downsample: float,
                        max_side: int = 2048) -> Path:
    """The overlay PNG of `slide` with the reduced mask `low` (bool; pixel = `low_factor` pixels of the level
    read, whose downsample is `level_downsample`): the mask reduced by block majority by powers of 2 until its
    longer side is at most `max_side`, over the slide read at the same downsample."""
    k = 1
    while max(low.shape) / k > max_side:
        k *= 2
    small = block_majority(low, k)
    thumb = slide.downsampled(max(1, int(round(low_factor * k * level_downsample))))
    if thumb.shape[:2] != small.shape:
        from PIL import Image
        thumb = np.asarray(Image.fromarray(thumb).resize((small.shape[1], small.shape[0]), Image.BOX))
    return write_overlay_png(path, thumb, small, max_side=max_side)


def block_majority(mask: np.ndarray, k: int) -> np.ndarray:
    """k x k blocks of a bool mask -> True where at least half of the block's pixels (edge blocks: of the
    pixels they have) are set. One block row at a time, so temporaries stay small."""
    if k == 1:
        return mask
    h, w = mask.shape
    if not mask.any():
        return np.zeros((-(-h // k), -(-w // k)), bool)
    cols = np.arange(0, w, k)
    col_counts = np.diff(np.append(cols, w))
    out = np.empty((len(range(0, h, k)), len(cols)), bool)
    for i, r in enumerate(range(0, h, k)):
        band = mask[r:r + k]
        sums = np.add.reduceat(band.sum(axis=0, dtype=np.int32), cols)
        out[i] = 2 * sums >= col_counts * len(band)
    return out
