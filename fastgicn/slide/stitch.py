"""Stitch overlapping tile predictions into one image, a band of rows at a time.

Tiles sit on a grid of columns and rows (the tile grid of a slide, in pixels of the output level). Where two
neighbouring tiles overlap, the stitcher either

- ``"crop"``: gives each pixel to one tile, the boundary between two neighbours lying in the middle of their
  overlap (for a regular grid with stride ``s`` and overlap ``o``: each tile keeps all but ``o/2`` pixels on
  each side that has a neighbour), so every pixel comes from the tile in which it is most central; or
- ``"blend"``: sums the tiles with weights that are 0 on the outer quarter of the overlap, ramp linearly
  across its middle half and are 1 on the inner quarter and everywhere else; two ramps facing each other sum to
  1 (and products of ramps at corners too), so the weights of a full grid are a partition of unity, a smooth
  prediction stays smooth and no seam shows.

Both modes throw away the outermost ``o/4`` (blend) or ``o/2`` (crop) pixels of a tile where it has a
neighbour: with a purely local model whose radius fits in that margin, the stitched image equals the model run
on the whole image (tests/test_stitch.py proves it). The first and last column and row of the grid keep their
outer pixels (nothing else covers them). A tile absent from the grid, or skipped (glass), counts as predicting
background (0): crop leaves its share of the overlap at 0, blend fades its neighbours' prediction to 0 across
the overlap.

Memory is bounded by a band of tile rows, not the image: as soon as no tile still to come can touch a row,
that row is final and is passed to the `sink` with every row above it, in order. The band is two tiles high
(`2 * tile_size` rows by the image width; 1 byte a pixel for crop, 2 for blend, whose sums are kept in 8.8
fixed point), enough for tiles arriving in grid order. Tiles may arrive in any
order: one that lands below the band while a tile above is still missing is kept aside (a copy of the tile)
until the band reaches it, so memory is the band plus the tiles that came out of order (the reader ring bounds
how many can).
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..errors import ConfigError

MODES = ("crop", "blend")

# sink(y0, rows): rows is a uint8 array (n, width), the final values of image rows y0 .. y0 + n - 1.
RowSink = Callable[[int, np.ndarray], None]


def _axis_cells(starts: np.ndarray, size: int, extent: int):
    """Per distinct tile start on one axis: the kept interval (crop) and the overlaps with its neighbours.

    Neighbours are consecutive distinct starts over the whole grid. Returns dicts start -> (lo, hi) of the kept
    interval in image coordinates (clipped to [0, extent)) and start -> (left overlap, right overlap) lengths.
    """
    uniq = np.unique(starts)
    keep, overlaps = {}, {}
    for i, s in enumerate(uniq.tolist()):
        lo, hi = s, s + size
        ov_lo = ov_hi = 0
        if i > 0:
            prev = int(uniq[i - 1])
            ov_lo = max(0, prev + size - s)
            if ov_lo:
                lo = s + ov_lo // 2
        if i + 1 < len(uniq):
            nxt = int(uniq[i + 1])
            ov_hi = max(0, s + size - nxt)
            if ov_hi:
                hi = nxt + ov_hi // 2
        keep[s] = (max(0, lo), min(extent, hi))
        overlaps[s] = (ov_lo, ov_hi)
    return keep, overlaps


def ramp(overlap: int) -> np.ndarray:
    """Blend weights over an overlap of `overlap` pixels, for the tile on its left (distance d from that tile's
    edge runs overlap-1 .. 0): 0 on the outer quarter, linear over the middle half, 1 on the inner quarter.
    `ramp(o) + ramp(o)[::-1] == 1` everywhere."""
    d = np.arange(overlap, dtype=np.float64)[::-1]  # distance from the left tile's right edge
    if overlap == 0:
        return np.zeros(0, np.float32)
    return np.clip((d + 0.5 - overlap / 4) / (overlap / 2), 0.0, 1.0).astype(np.float32)


def _weights_1d(size: int, ov_lo: int, ov_hi: int) -> np.ndarray:
    w = np.ones(size, np.float32)
    if ov_lo:
        w[:ov_lo] = np.minimum(w[:ov_lo], ramp(ov_lo)[::-1])
    if ov_hi:
        w[size - ov_hi:] = np.minimum(w[size - ov_hi:], ramp(ov_hi))
    return w


class Stitcher:
    """Place tile predictions (uint8, `tile_size` square) into a `width` x `height` image, flushing finished
    rows to `sink` in order.

    `tiles` is an (N, 2) or (N, 4) integer array whose first two columns are each tile's top-left corner
    ``lvl_x, lvl_y`` in output pixels; every tile covers ``tile_size`` pixels each way (the part beyond the
    image is dropped). Call `add(i, pixels)` or `skip(i)` once for each tile index, in any order, then `close()`;
    rows no tile covers come out as 0.
    """

    def __init__(self, tiles, width: int, height: int, tile_size: int, sink: RowSink, mode: str = "crop"):
        if mode not in MODES:
            raise ConfigError(f"stitch mode {mode!r}: use one of {MODES}")
        tiles = np.asarray(tiles)
        if tiles.ndim != 2 or tiles.shape[1] < 2 or not np.issubdtype(tiles.dtype, np.integer):
            raise ConfigError(f"tiles must be an (N, 2) or (N, 4) integer array of lvl_x, lvl_y, got "
                              f"{tiles.dtype} {tiles.shape}")
        if width <= 0 or height <= 0 or tile_size <= 0:
            raise ConfigError(f"image {width} x {height} with tiles of {tile_size}: sizes must be positive")
        self.width, self.height, self.tile_size, self.mode, self.sink = int(width), int(height), int(tile_size), \
            mode, sink
        self.xy = tiles[:, :2].astype(np.int64)
        n = len(self.xy)
        keep_x, ov_x = _axis_cells(self.xy[:, 0], tile_size, self.width)
        keep_y, ov_y = _axis_cells(self.xy[:, 1], tile_size, self.height)
        xs, ys = self.xy[:, 0].tolist(), self.xy[:, 1].tolist()
        if mode == "crop":
            self.cols = np.array([keep_x[x] for x in xs], np.int64).reshape(n, 2)
            self.rows = np.array([keep_y[y] for y in ys], np.int64).reshape(n, 2)
        else:
            self.cols = np.array([(max(0, x), min(self.width, x + tile_size)) for x in xs], np.int64).reshape(n, 2)
            self.rows = np.array([(max(0, y), min(self.height, y + tile_size)) for y in ys], np.int64).reshape(n, 2)
        self._ov_x = [ov_x[x] for x in xs]
        self._ov_y = [ov_y[y] for y in ys]
        self._wcache: dict = {}
        # tiles in the order their first row comes; the frontier is the first row of the first unfinished one
        self._order = np.argsort(self.rows[:, 0], kind="stable")
        self._first_rows = self.rows[self._order, 0]
        self._done = np.zeros(n, bool)
        self._cursor = 0
        self.flushed = 0  # rows [0, flushed) have gone to the sink
        # band buffer: rows [flushed, flushed + capacity)
        self._alloc(min(self.height, 2 * tile_size))
        self._deferred: dict[int, np.ndarray] = {}  # tiles that came too far ahead of the band
        self.peak_deferred = 0
        self.tiles_added = 0
        self.tiles_skipped = 0
        self._closed = False

    # -- buffer -----------------------------------------------------------------------------------------
    def _alloc(self, cap: int) -> None:
        self._band_rows = cap
        # crop: the pixels; blend: sum of weight * pixel in 8.8 fixed point (at most 255 * 256 + rounding)
        self._acc = np.zeros((cap, self.width), np.uint8 if self.mode == "crop" else np.uint16)

    @property
    def peak_band_rows(self) -> int:
        """Rows the band holds (fixed: two tiles, or the image height if smaller)."""
        return self._band_rows

    @property
    def band_bytes(self) -> int:
        """Bytes held by the band buffer now."""
        return self._acc.nbytes

    def _frontier(self) -> int:
        """First row a tile still to come can touch (the image height when none is left)."""
        n = len(self._order)
        while self._cursor < n and self._done[self._order[self._cursor]]:
            self._cursor += 1
        return min(int(self._first_rows[self._cursor]), self.height) if self._cursor < n else self.height

    def _weights(self, i: int) -> np.ndarray:
        key = (self._ov_x[i], self._ov_y[i])
        w = self._wcache.get(key)
        if w is None:
            t = self.tile_size
            w = np.outer(_weights_1d(t, *key[1]), _weights_1d(t, *key[0])) * np.float32(256)
            self._wcache[key] = w
        return w

    # -- tiles ------------------------------------------------------------------------------------------
    def _check_index(self, i: int) -> int:
        i = int(i)
        if not 0 <= i < len(self.xy):
            raise ConfigError(f"tile index {i} is outside the grid of {len(self.xy)} tiles")
        if self._done[i] or i in self._deferred:
            raise ConfigError(f"tile {i} at {tuple(self.xy[i])} was already stitched: give each tile once")
        if self._closed:
            raise ConfigError("the stitcher is closed: no more tiles can be added")
        return i

    def add(self, i: int, pixels: np.ndarray) -> None:
        """Stitch tile `i` (a `tile_size` x `tile_size` uint8 array). A tile too far below the rows still
        open is kept aside (a copy) until the band reaches it, so the band never grows."""
        i = self._check_index(i)
        t = self.tile_size
        if pixels.shape != (t, t):
            raise ConfigError(f"tile {i}: got pixels of shape {pixels.shape}, expected ({t}, {t})")
        if self.rows[i, 1] - self.flushed > self._acc.shape[0]:
            self._flush_to(self._frontier())  # rows above every tile still to come (glass gaps) are final
        if self.rows[i, 1] - self.flushed > self._acc.shape[0]:
            self._deferred[i] = np.array(pixels, np.uint8, copy=True)
            self.peak_deferred = max(self.peak_deferred, len(self._deferred))
            return
        self._place(i, pixels)
        self._finish(i)

    def _place(self, i: int, pixels: np.ndarray) -> None:
        x, y = self.xy[i]
        (r0, r1), (c0, c1) = self.rows[i], self.cols[i]
        if r1 > r0 and c1 > c0:
            if r0 < self.flushed:  # cannot happen unless the frontier logic is broken
                raise RuntimeError(f"tile {i} touches row {r0}, already flushed up to {self.flushed}")
            src = pixels[r0 - y:r1 - y, c0 - x:c1 - x]
            b0, b1 = r0 - self.flushed, r1 - self.flushed
            if self.mode == "crop":
                self._acc[b0:b1, c0:c1] = src
            else:
                w = self._weights(i)[r0 - y:r1 - y, c0 - x:c1 - x]  # 256 * weight
                self._acc[b0:b1, c0:c1] += (src * w + 0.5).astype(np.uint16)
        self.tiles_added += 1

    def skip(self, i: int) -> None:
        """Tile `i` will not come (rejected as glass): its share of the image stays 0."""
        i = self._check_index(i)
        self.tiles_skipped += 1
        self._finish(i)

    def _finish(self, i: int) -> None:
        self._done[i] = True
        while True:
            self._flush_to(self._frontier())
            cap = self._acc.shape[0]
            ready = [j for j in self._deferred if self.rows[j, 1] - self.flushed <= cap]
            if not ready:
                return
            for j in ready:
                self._place(j, self._deferred.pop(j))
                self._done[j] = True

    def _flush_to(self, row: int) -> None:
        count = row - self.flushed
        if count <= 0:
            return
        cap = self._acc.shape[0]
        while count > 0:
            m = min(count, cap)
            if self.mode == "crop":
                out = self._acc[:m].copy()
            else:  # round the 8.8 fixed-point sums
                out = np.minimum((self._acc[:m] + np.uint16(128)) >> 8, 255).astype(np.uint8)
            self.sink(self.flushed, out)
            # shift the rest of the band up and clear the freed rows
            self._acc[:cap - m] = self._acc[m:]
            self._acc[cap - m:] = 0
            self.flushed += m
            count -= m

    def close(self) -> None:
        """Check every tile came, flush the last rows. Raises ConfigError naming missing tiles."""
        if self._closed:
            return
        missing = np.flatnonzero(~self._done)
        if len(missing):
            raise ConfigError(f"{len(missing)} of {len(self.xy)} tiles were never stitched (first: index "
                              f"{missing[0]} at {tuple(self.xy[missing[0]])}); add or skip every tile")
        self._flush_to(self.height)
        self._closed = True
        self._acc = self._acc[:0]


def stitch_to_array(tiles, width: int, height: int, tile_size: int, pixels, mode: str = "crop",
                    order=None) -> np.ndarray:
    """Stitch all tiles at once into a full (height, width) uint8 array (small images and tests).

    `pixels[i]` is tile i's prediction; `order` is the order tiles are fed (default: grid order).
    """
    out = np.zeros((height, width), np.uint8)
    written = []

    def sink(y0, rows):
        written.append((y0, len(rows)))
        out[y0:y0 + len(rows)] = rows

    st = Stitcher(tiles, width, height, tile_size, sink, mode)
    for i in (range(len(tiles)) if order is None else order):
        if pixels[i] is None:
            st.skip(i)
        else:
            st.add(i, pixels[i])
    st.close()
    return out
