"""The 2x2 reductions behind every pyramid level: level sizes, `downsample2` (mean, majority, max), the
reduction of a level-0 tile, and the cascade that builds levels 1..n a band of rows at a time."""
from __future__ import annotations

import math

import numpy as np

from .._tiler import uniform_u8
from ..errors import ConfigError

DOWNSAMPLE_MODES = ("mean", "majority", "max")
# Rows are reduced in chunks this wide, so temporaries stay small however wide the slide is.
_REDUCE_CHUNK_COLUMNS = 4096


def pyramid_sizes(width: int, height: int, min_level_size: int = 1024,
                  level_step: int = 2) -> list[tuple[int, int]]:
    """Sizes of the levels: level 0, then each `level_step` times smaller than the one above until the long
    side fits. A level is the 2x halving (rounded up) repeated, so `level_step=4` gives 1, 4, 16, ... with
    sizes ceil(ceil(w / 2) / 2), ...."""
    halvings = _halvings(level_step)
    sizes = [(width, height)]
    while max(sizes[-1]) > min_level_size:
        w, h = sizes[-1]
        for _ in range(halvings):
            w, h = (w + 1) // 2, (h + 1) // 2
        sizes.append((w, h))
    return sizes


def _halvings(level_step) -> int:
    """log2 of a level step (a power of two, at least 2)."""
    if (isinstance(level_step, bool) or not isinstance(level_step, (int, np.integer)) or level_step < 2
            or level_step & (level_step - 1)):
        raise ConfigError(f"level_step={level_step!r}: use a power of two, 2 (a level at every power of "
                          "two) or 4 (downsamples 1, 4, 16, ... as Aperio scanners write them)")
    return int(level_step).bit_length() - 1


def _cascade_sizes(width: int, height: int, depth: int) -> list[tuple[int, int]]:
    """Level 0 and its first `depth` 2x halvings (rounded up)."""
    sizes = [(width, height)]
    for _ in range(depth):
        w, h = sizes[-1]
        sizes.append(((w + 1) // 2, (h + 1) // 2))
    return sizes


def downsample2(block: np.ndarray, mode: str = "mean") -> np.ndarray:
    """2x2 reduction of a uint8 H x W or H x W x C block; odd sizes reduce the edge pixels that exist."""
    if mode not in DOWNSAMPLE_MODES:
        raise ConfigError(f"downsample mode {mode!r}: use one of {DOWNSAMPLE_MODES}")
    if block.shape[0] % 2 or block.shape[1] % 2:
        pad = [(0, block.shape[0] % 2), (0, block.shape[1] % 2)] + [(0, 0)] * (block.ndim - 2)
        block = np.pad(block, pad, mode="edge")
    h, w = block.shape[0] // 2, block.shape[1] // 2
    if mode == "mean":
        # Sum row pairs over whole rows, then column pairs as the two halves of (2 x channels)-wide groups:
        # NumPy's inner loops stay long (strided views with a last axis of 3 are several times slower).
        c = block.shape[2] if block.ndim == 3 else 1
        rows = block[0::2].astype(np.uint16)
        rows += block[1::2]
        pairs = rows.reshape(h * w, 2 * c)
        total = pairs[:, :c] + pairs[:, c:]
        total += 2
        total >>= 2
        return total.astype(np.uint8).reshape((h, w) + block.shape[2:])
    a, b = block[0::2, 0::2], block[0::2, 1::2]
    c, d = block[1::2, 0::2], block[1::2, 1::2]
    if mode == "majority":
        votes = (a >= 128).astype(np.uint8) + (b >= 128) + (c >= 128) + (d >= 128)
        return np.where(votes >= 2, np.uint8(255), np.uint8(0))
    return np.maximum(np.maximum(a, b), np.maximum(c, d))


def uniform_value(block: np.ndarray) -> int | None:
    """The value of a single-channel block whose pixels are all equal, else None."""
    if block.ndim != 2:
        return None
    if block.dtype == np.uint8 and block.size:  # one Cython pass that stops at the first row that differs
        value = uniform_u8(block)
        return None if value < 0 else value
    low = int(block.min())
    return low if low == int(block.max()) else None


def reduce_tile(pixels: np.ndarray, value: int | None, mode: str) -> np.ndarray:
    """The 2x2 reduction of a level-0 tile; a uniform tile (`value`) reduces to the same value in every mode
    (majority: 255 or 0)."""
    if value is None:
        return downsample2(pixels, mode)
    reduced = value if mode != "majority" else (255 if value >= 128 else 0)
    return np.full(((pixels.shape[0] + 1) // 2, (pixels.shape[1] + 1) // 2), reduced, np.uint8)


class _Cascade:
    """Builds levels 1..n from level-0 tiles: one band of `tile` rows per level, reduced 2x2 into the next.

    `sizes` are every 2x level computed; the tiles of those in `keep` (indices into `sizes`) are handed to
    `emit(level, block)` in row-major order (a copy of its own, so `emit` may encode it later, on another
    thread; a uniform single-channel tile comes as `emit(level, view, value)`, not copied: `emit` must use it
    before it returns), and level `collect` (if not None) is also gathered whole into `overview`."""

    def __init__(self, sizes, channels, tile, mode, emit, keep=None, collect=None):
        self.sizes, self.tile, self.mode, self.emit = sizes, tile, mode, emit
        self.keep = set(range(1, len(sizes)) if keep is None else keep) - {0}
        self.collect = collect
        self.shape = (channels,) if channels > 1 else ()
        self.bands = [None] + [np.zeros((tile, w) + self.shape, np.uint8) for w, _ in sizes[1:]]
        self.band_row = [0] * len(sizes)  # index of the band (tile row) each level is filling
        self.filled = [0] * len(sizes)  # rows of that band filled so far
        self.emitted = [0] * len(sizes)  # tiles handed to `emit`, per level
        self.overview = None
        if collect is not None:
            w, h = sizes[collect]
            self.overview = np.zeros((h, w) + self.shape, np.uint8)

    def add_level0_tile(self, t_row: int, t_col: int, pixels: np.ndarray, small: np.ndarray | None) -> None:
        """Place a level-0 tile: `small` is its 2x2 reduction (`reduce_tile`), None when level 0 is the only
        level."""
        if self.collect == 0:
            y, x = t_row * self.tile, t_col * self.tile
            self.overview[y:y + pixels.shape[0], x:x + pixels.shape[1]] = pixels
        if len(self.sizes) == 1:
            return
        half = self.tile // 2
        y = (t_row % 2) * half
        self.bands[1][y:y + small.shape[0], t_col * half:t_col * half + small.shape[1]] = small

    def end_level0_row(self, t_row: int) -> None:
        if len(self.sizes) == 1:
            return
        rows = min(self.tile, self.sizes[0][1] - t_row * self.tile)
        self._add_rows(1, (rows + 1) // 2)

    def _add_rows(self, level: int, rows: int) -> None:
        self.filled[level] += rows
        band_top = self.band_row[level] * self.tile
        band_rows = min(self.tile, self.sizes[level][1] - band_top)
        if self.filled[level] < band_rows:
            return
        self._flush(level, band_rows)

    def _flush(self, level: int, band_rows: int) -> None:
        width = self.sizes[level][0]
        band = self.bands[level][:band_rows, :width]
        if level in self.keep:
            for x in range(0, width, self.tile):
                block = band[:, x:x + self.tile]
                value = uniform_value(block)
                if value is None:  # a copy: the band is filled again while the tile waits
                    self.emit(level, np.array(block, copy=True))
                else:  # glass or a constant map: encoded from its value at once, no copy
                    self.emit(level, block, value)
                self.emitted[level] += 1
        if level == self.collect:
            top = self.band_row[level] * self.tile
            self.overview[top:top + band_rows] = band
        self.band_row[level] += 1
        self.filled[level] = 0
        if level + 1 < len(self.sizes):
            below = self.bands[level + 1]
            y = ((self.band_row[level] - 1) % 2) * (self.tile // 2)
            for x in range(0, width, _REDUCE_CHUNK_COLUMNS):
                chunk = band[:, x:x + _REDUCE_CHUNK_COLUMNS]
                value = uniform_value(chunk)  # a uniform chunk reduces to its value: no arithmetic
                small = downsample2(chunk, self.mode) if value is None else reduce_tile(chunk, value, self.mode)
                below[y:y + small.shape[0], x // 2:x // 2 + small.shape[1]] = small
            self._add_rows(level + 1, (band_rows + 1) // 2)

    def check_complete(self) -> None:
        for level in sorted(self.keep):
            w, h = self.sizes[level]
            expected = math.ceil(w / self.tile) * math.ceil(h / self.tile)
            if self.emitted[level] != expected:
                raise RuntimeError(f"pyramid level {level}: {self.emitted[level]} tiles built, "
                                   f"expected {expected}")
