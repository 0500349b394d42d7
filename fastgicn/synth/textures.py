"""The periodic textures of a synthetic slide (collagen fibres, chromatin, cytoplasm), made once per slide
from its seed, and windows into periodic tables."""
from __future__ import annotations

import numpy as np

_TABLE = 512  # period of the fibre and chromatin textures
_RENDER_CHUNK = 512  # level-0 pixels a side rendered at once, so big regions stay in bounded memory


def _periodic_blur(img: np.ndarray, radius: int, axis: int) -> np.ndarray:
    out = img.copy()
    for shift in range(1, radius + 1):
        out += np.roll(img, shift, axis) + np.roll(img, -shift, axis)
    return out / (2 * radius + 1)


def _fibre_texture(rng: np.random.Generator, direction: float) -> np.ndarray:
    """A periodic _TABLE x _TABLE uint8 texture of wavy collagen fibres running roughly along `direction`."""
    canvas = np.zeros((_TABLE, _TABLE))
    for _ in range(420):
        x0, y0 = rng.uniform(0, _TABLE, 2)
        theta = direction + rng.normal(0, 0.18)
        length, amp = rng.uniform(60, 320), rng.uniform(0.5, 5.0)
        wavelength, phase = rng.uniform(30, 120), rng.uniform(0, 2 * np.pi)
        t = np.arange(0, length, 0.5)
        wave = amp * np.sin(2 * np.pi * t / wavelength + phase)
        xs = x0 + t * np.cos(theta) - wave * np.sin(theta)
        ys = y0 + t * np.sin(theta) + wave * np.cos(theta)
        strength = rng.uniform(0.4, 1.0)
        for off in range(int(rng.integers(1, 4))):  # fibre thickness 1..3 px
            np.add.at(canvas, ((ys + off * np.cos(theta)).astype(np.int64) % _TABLE,
                               (xs - off * np.sin(theta)).astype(np.int64) % _TABLE), strength)
    canvas = _periodic_blur(_periodic_blur(canvas, 1, 0), 1, 1)
    fibres = 1.0 - np.exp(-canvas * 1.6)
    # pale clefts between collagen bundles: a slow periodic modulation
    gaps = _periodic_blur(_periodic_blur(rng.random((_TABLE, _TABLE)), 12, 0), 12, 1)
    gaps = np.clip((gaps - gaps.mean()) / (gaps.std() + 1e-9) * 0.35 + 0.8, 0.25, 1.0)
    return np.clip(fibres * gaps * 255 + 0.5, 0, 255).astype(np.uint8)


def _blob_texture(rng: np.random.Generator, radius: int) -> np.ndarray:
    """A periodic uint8 texture of soft blobs (chromatin clumps, cytoplasm granularity)."""
    img = _periodic_blur(_periodic_blur(rng.random((_TABLE, _TABLE)), radius, 0), radius, 1)
    img = (img - img.mean()) / (img.std() + 1e-9)
    return np.clip(img * 60 + 128, 0, 255).astype(np.uint8)


def _wrap_pad(table: np.ndarray, margin: int = _RENDER_CHUNK) -> np.ndarray:
    """A periodic table extended by `margin` wrapped rows and columns, so windows are plain slices."""
    return np.pad(table, [(0, margin), (0, margin)] + [(0, 0)] * (table.ndim - 2), mode="wrap")


def _window(padded: np.ndarray, period: int, x0: int, y0: int, w: int, h: int) -> np.ndarray:
    """The h x w window at (x0, y0) of a periodic table given by `_wrap_pad` (a view when it fits)."""
    oy, ox = y0 % period, x0 % period
    if h <= padded.shape[0] - period and w <= padded.shape[1] - period:
        return padded[oy:oy + h, ox:ox + w]
    rows, cols = (np.arange(h) + oy) % period, (np.arange(w) + ox) % period
    return padded[:period, :period].take(rows, axis=0).take(cols, axis=1)
