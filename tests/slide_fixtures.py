"""Tiny slide files for the reader, tissue and grid tests, written with tifffile and PIL.

A pyramid keeps its levels in the main IFD chain, tiled 256 x 256, lower levels marked
NewSubfileType = reduced image (OpenSlide's generic-tiff driver ignores them otherwise); an SVS is the
same with an Aperio ImageDescription on level 0. Lossless (deflate) unless JPEG is asked for.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile

APERIO_DESCRIPTION = ("Aperio Image Library v12.0.15\r\n{w}x{h} [0,0 {w}x{h}] (256x256) JPEG/RGB Q=90"
                      "|AppMag = 40|MPP = 0.25|Filename = fixture")


def halve(rgb: np.ndarray) -> np.ndarray:
    """2 x 2 block mean, rounded (the way the fixtures' lower levels are made)."""
    h, w = rgb.shape[0] // 2 * 2, rgb.shape[1] // 2 * 2
    blocks = rgb[:h, :w].reshape(h // 2, 2, w // 2, 2, 3).astype(np.uint16).sum(axis=(1, 3))
    return ((blocks + 2) // 4).astype(np.uint8)


def he_like(h: int, w: int, seed: int = 0) -> np.ndarray:
    """White glass with pink and purple blobs and some fine texture; smooth enough for JPEG."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.full((h, w, 3), 242, np.float32)
    for cy, cx, r, colour in [(0.35, 0.3, 0.22, (225, 140, 190)), (0.6, 0.7, 0.18, (150, 90, 170)),
                              (0.75, 0.25, 0.1, (200, 120, 180))]:
        d = np.hypot((yy - cy * h) / h, (xx - cx * w) / w)
        inside = np.clip((r - d) * 40, 0, 1)[..., None]
        img = img * (1 - inside) + np.array(colour, np.float32) * inside
    img += 6 * np.sin(xx / 7)[..., None] * np.cos(yy / 9)[..., None]
    img += rng.normal(0, 1.5, img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def padded(arr: np.ndarray, x: int, y: int, w: int, h: int) -> np.ndarray:
    """Reference crop: arr[y:y + h, x:x + w] with white wherever that lies outside arr."""
    out = np.full((h, w, 3), 255, np.uint8)
    H, W = arr.shape[:2]
    x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, W), min(y + h, H)
    if x1 > x0 and y1 > y0:
        out[y0 - y:y1 - y, x0 - x:x1 - x] = arr[y0:y1, x0:x1]
    return out


def write_pyramid(path: Path, level0: np.ndarray, levels: int = 3, *, svs: bool = False, jpeg: bool = False,
                  mpp: float | None = 0.25) -> list[np.ndarray]:
    """Write `level0` and `levels - 1` halvings as a tiled pyramidal TIFF; returns the level arrays."""
    arrays = [level0]
    for _ in range(levels - 1):
        arrays.append(halve(arrays[-1]))
    h, w = level0.shape[:2]
    compression = ("jpeg", {"level": 92}) if jpeg else ("zlib", {"level": 6})
    with tifffile.TiffWriter(path) as tw:
        for i, arr in enumerate(arrays):
            kw = {}
            if i == 0 and svs:
                kw["description"] = APERIO_DESCRIPTION.format(w=w, h=h)
            if i > 0:
                kw["subfiletype"] = 1
            if mpp is not None and not svs:
                per_cm = 1e4 / (mpp * w / arr.shape[1])
                kw["resolution"] = (per_cm, per_cm)
                kw["resolutionunit"] = "CENTIMETER"
            tw.write(arr, tile=(256, 256), photometric="rgb", compression=compression[0],
                     compressionargs=compression[1], metadata=None, **kw)
    return arrays


def reference_reduce(img: np.ndarray, mode: str) -> np.ndarray:
    """Independent 2x2 reduction: blocks cut by the border use the pixels that exist (written with loops over
    the four block offsets and explicit counts, not by edge padding as the writer does)."""
    h, w = img.shape[:2]
    oh, ow = (h + 1) // 2, (w + 1) // 2
    total = np.zeros((oh, ow) + img.shape[2:], np.float64)
    count = np.zeros((oh, ow) + (1,) * (img.ndim - 2), np.float64)
    votes = np.zeros_like(total)
    for dy in (0, 1):
        for dx in (0, 1):
            part = img[dy::2, dx::2].astype(np.float64)
            total[:part.shape[0], :part.shape[1]] += part
            votes[:part.shape[0], :part.shape[1]] += part >= 128
            count[:part.shape[0], :part.shape[1]] += 1
    if mode == "mean":
        return np.floor(total / count + 0.5).astype(np.uint8)
    # majority: at least half of the existing pixels are foreground (2 of 4, 1 of 2, 1 of 1)
    return np.where(votes / count >= 0.5, 255, 0).astype(np.uint8)
