"""Stain colours (a Beer-Lambert table over eosin and hematoxylin amounts) and the nuclei populations."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .noise import _hash, _rehash, _unit

_GLASS = np.array([243, 243, 246], np.float64)  # scanner white, RGB
_EOSIN_OD = np.array([0.019, 0.267, 0.129])  # log10 optical density at full eosin (index 255)
_HEMATOXYLIN_OD = np.array([0.599, 0.715, 0.307])  # at full hematoxylin


def _stain_lut() -> np.ndarray:
    """RGB (65536 x 3 uint8) for eosin index e and hematoxylin index h at row e * 256 + h (Beer-Lambert)."""
    e = np.arange(256)[:, None, None] / 255.0
    h = np.arange(256)[None, :, None] / 255.0
    od = e * _EOSIN_OD + h * _HEMATOXYLIN_OD
    return np.clip(_GLASS * 10.0 ** (-od) + 0.5, 0, 255).astype(np.uint8).reshape(-1, 3)


# ---------------------------------------------------------------------------------------------------------
# Nuclei


@dataclass(frozen=True)
class _Nuclei:
    """One population of nuclei on a jittered grid: at most one per `cell` x `cell` square."""

    cell: int
    key: int
    stamp: int  # half-size of the square each nucleus is drawn in
    tumour: bool

    def candidates(self, x0: int, y0: int, x1: int, y1: int):
        """Cells whose nucleus can touch [x0, x1) x [y0, y1): centres (float64) and per-nucleus hashes."""
        r = self.stamp + 1
        i = np.arange((x0 - r) // self.cell, (x1 + r) // self.cell + 1)
        j = np.arange((y0 - r) // self.cell, (y1 + r) // self.cell + 1)
        ii, jj = np.meshgrid(i, j)
        ii, jj = ii.ravel(), jj.ravel()
        h = _hash(ii, jj, self.key)
        cx = (ii + 0.1 + 0.8 * _unit(h)) * self.cell
        cy = (jj + 0.1 + 0.8 * _unit(_rehash(h, 1))) * self.cell
        keep = (cx > x0 - r) & (cx < x1 + r) & (cy > y0 - r) & (cy < y1 + r)
        return cx[keep], cy[keep], h[keep]
