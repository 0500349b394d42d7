"""A reduced copy of the stitched rows (block means at a power-of-two scale), for polygons, the overlay and areas."""
from __future__ import annotations

import math

import numpy as np

from .._tiler import add_block_sums_u8, max_count_u8
from ..errors import ConfigError

__all__ = ["LowRes", "lowres_factor"]


class LowRes:
    """Block means of a stream of uint8 rows: image (height, width) -> (ceil(height/f), ceil(width/f)).

    `add(y0, rows)` takes rows in order; `result()` gives the mean of each block rounded to uint8 (half to
    even; partial blocks at the right and bottom edges average the pixels they have). For a 0/255 mask,
    ``result() >= 128`` is exactly "at least half of the block is set". Also counts pixels >= `count_threshold`.
    """

    def __init__(self, width: int, height: int, factor: int, count_threshold: int = 128):
        if factor < 1:
            raise ConfigError(f"factor={factor}: use an integer >= 1")
        self.width, self.height, self.factor = int(width), int(height), int(factor)
        self.out_w, self.out_h = math.ceil(width / factor), math.ceil(height / factor)
        self.out = np.zeros((self.out_h, self.out_w), np.uint8)
        self._col_starts = np.arange(0, self.width, factor)
        self._col_counts = np.diff(np.append(self._col_starts, self.width))
        self._acc = np.zeros(self.out_w, np.uint64)  # per block of the current block row
        self._dirty = False  # whether _acc holds anything but zeros
        self._rows_in_block = 0
        self._next = 0
        self.count_threshold = count_threshold
        self.count = 0  # pixels >= count_threshold seen so far

    def add(self, y0: int, rows: np.ndarray, blank: bool | None = None) -> None:
        """Add `rows` (uint8, (n, width)) at row `y0`. `blank=True` promises the rows are all zeros (the
        caller has just looked), which saves a pass over them."""
        if y0 != self._next:
            raise ConfigError(f"LowRes rows must come in order: got {y0}, expected {self._next}")
        self._next += len(rows)
        if not blank:
            peak, counted = _max_count(rows, self.count_threshold)  # one pass
            blank = peak == 0  # glass gaps (and tissue without tumour in a mask): only the bookkeeping
        if not blank:
            self.count += counted
        fast = rows.dtype == np.uint8 and rows.ndim == 2
        i = 0
        f = self.factor
        while i < len(rows):
            y = y0 + i
            block = y // f
            block_end = min((block + 1) * f, self.height)
            take = min(len(rows) - i, block_end - y)
            if not blank:
                if fast:
                    add_block_sums_u8(rows[i:i + take], f, self._acc)
                else:
                    col_sums = rows[i:i + take].sum(axis=0, dtype=np.uint64)
                    self._acc += np.add.reduceat(col_sums, self._col_starts)
                self._dirty = True
            self._rows_in_block += take
            i += take
            if y + take == block_end:
                if self._dirty:  # a block of zeros keeps the zeros `out` starts with
                    self.out[block] = np.rint(self._acc / (self._col_counts * self._rows_in_block))
                    self._acc[:] = 0
                    self._dirty = False
                self._rows_in_block = 0

    def result(self) -> np.ndarray:
        if self._next != self.height:
            raise ConfigError(f"LowRes got {self._next} of {self.height} rows")
        return self.out


def _max_count(rows: np.ndarray, threshold) -> tuple[int, int]:
    """(max, count of pixels >= threshold) of the rows: one Cython pass (GIL released) for 2-D uint8 rows
    and a byte threshold, NumPy otherwise."""
    if rows.dtype == np.uint8 and rows.ndim == 2 and isinstance(threshold, (int, np.integer)) \
            and not isinstance(threshold, bool) and 0 <= threshold <= 255:
        return max_count_u8(rows, int(threshold))
    if not rows.size:
        return 0, 0
    return int(rows.max()), int(np.count_nonzero(rows >= threshold))


def lowres_factor(width: int, height: int, max_side: int) -> int:
    """The smallest power of two f with ceil(max(width, height) / f) <= max_side."""
    f = 1
    while math.ceil(max(width, height) / f) > max_side:
        f *= 2
    return f
