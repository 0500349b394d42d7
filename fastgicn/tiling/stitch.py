"""Stitch overlapping tile predictions into one image, a band of rows at a time: the one stitcher of the code
base (`segment_slide` and `fastgicn.engine.streaming.TileStream` both use it).

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

Arithmetic. Crop, and blend on a grid without overlap (every weight is 1), copy the kept part of each tile:
no weights at all. Blend with overlap is exact integer fixed point (8.8, 256 is 1): the 1-D ramp of an
overlap is ``ramp_fixed(o) = floor(256 * ramp(o) + 1/2)``, mirrored so that the two facing ramps sum to exactly
256; a tile's weight is the product ``u * v`` of its column and row weights (each 0..256) brought back to 8.8,
``(u * v + 128) >> 8`` (half up) where the tile lies on the same side of both overlaps of a corner (top-left
or bottom-right) and ``(u * v + 127) >> 8`` (half down) on the other two, so the four weights at a corner sum to
exactly 256 and the weights of a full grid are an exact partition of unity. A pixel is ``min((sum of p * w +
128) >> 8, 255)``: where every tile covering it predicts the same value, that value, bit for bit. The weight
tiles are computed once per edge configuration (which of the four sides has which overlap) and the sums run
in one Cython loop per batch (`fastgicn._tiler.stitch_blend`, GIL released).

Memory is bounded by a band of tile rows, not the image: as soon as no tile still to come can touch a row,
that row is final and is passed to the `sink` with every row above it, in order. The band is two tiles high
(`2 * tile_size` rows by the image width; 1 byte a pixel for crop, 2 for blend with overlap, whose sums are
kept in 8.8 fixed point), enough for tiles arriving in grid order. Tiles may arrive in any
order: one that lands below the band while a tile above is still missing is kept aside (a copy of the tile)
until the band reaches it, so memory is the band plus the tiles that came out of order (the reader ring bounds
how many can).

Feeding: `add_batch(indices, probs)` (a batch as the device runner hands it back, in the ring's order) or
`add(i, pixels)` per tile, `skip(i)` / `skip_batch(indices)` for tiles rejected as glass, then `close()`. A
`Stitcher` holds no thread state: call it from any one thread at a time (the sink runs on that thread).
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .. import _tiler
from ..errors import ConfigError

MODES = ("crop", "blend")
ONE = 256  # 1.0 in the 8.8 fixed point of blend weights

# sink(y0, rows): rows is a uint8 array (n, width), the final values of image rows y0 .. y0 + n - 1.
RowSink = Callable[[int, np.ndarray], None]


def _axis_cells(starts: np.ndarray, size: int, extent: int):
    """Per tile start on one axis (an int64 array): the kept interval (crop) and the overlaps with its
    neighbours.

    Neighbours are consecutive distinct starts over the whole grid. Returns four int64 arrays shaped like
    `starts`: the kept interval ``lo, hi`` in image coordinates (clipped to [0, extent)) and the overlap
    lengths with the previous and the next distinct start.
    """
    uniq, inv = np.unique(starts, return_inverse=True)
    prev = np.concatenate([[np.iinfo(np.int64).min // 2], uniq[:-1]])
    nxt = np.concatenate([uniq[1:], [np.iinfo(np.int64).max // 2]])
    ov_lo = np.clip(prev + size - uniq, 0, None)
    ov_hi = np.clip(uniq + size - nxt, 0, None)
    ov_lo[0] = 0
    ov_hi[-1] = 0
    lo = np.where(ov_lo > 0, uniq + ov_lo // 2, uniq)
    hi = np.where(ov_hi > 0, nxt + ov_hi // 2, uniq + size)
    lo, hi = np.maximum(0, lo), np.minimum(extent, hi)
    inv = inv.reshape(-1)
    return lo[inv], hi[inv], ov_lo[inv], ov_hi[inv]


def _ramp64(overlap: int) -> np.ndarray:
    d = np.arange(overlap, dtype=np.float64)[::-1]  # distance from the left tile's right edge
    return np.clip((d + 0.5 - overlap / 4) / (overlap / 2), 0.0, 1.0)


def ramp(overlap: int) -> np.ndarray:
    """Blend weights over an overlap of `overlap` pixels, for the tile on its left (distance d from that tile's
    edge runs overlap-1 .. 0): 0 on the outer quarter, linear over the middle half, 1 on the inner quarter.
    `ramp(o) + ramp(o)[::-1] == 1` everywhere."""
    if overlap <= 0:
        return np.zeros(0, np.float32)
    return _ramp64(overlap).astype(np.float32)


def ramp_fixed(overlap: int) -> np.ndarray:
    """`ramp(overlap)` in 8.8 fixed point (int64, 0..256): ``floor(256 * ramp + 1/2)`` on the left half, the
    right half mirrored so that ``ramp_fixed(o) + ramp_fixed(o)[::-1] == 256`` exactly."""
    if overlap <= 0:
        return np.zeros(0, np.int64)
    r = np.floor(_ramp64(overlap) * ONE + 0.5).astype(np.int64)
    half = overlap // 2
    r[overlap - half:] = ONE - r[:half][::-1]
    return r


def _weights_1d(size: int, ov_lo: int, ov_hi: int) -> np.ndarray:
    """8.8 weights (int64, 0..256) along one axis of a tile with overlaps `ov_lo` / `ov_hi` at its two ends."""
    w = np.full(size, ONE, np.int64)
    if ov_lo:
        w[:ov_lo] = np.minimum(w[:ov_lo], ramp_fixed(ov_lo)[::-1])
    if ov_hi:
        w[size - ov_hi:] = np.minimum(w[size - ov_hi:], ramp_fixed(ov_hi))
    return w


def blend_weights(size: int, ov_x: tuple[int, int], ov_y: tuple[int, int]) -> np.ndarray:
    """The (size, size) uint16 8.8 weight tile of a tile whose column overlaps its neighbours by ``ov_x = (left,
    right)`` pixels and whose row overlaps by ``ov_y = (top, bottom)``: ``(u * v + 128) >> 8`` of its column
    and row weights u, v, or ``(u * v + 127) >> 8`` where the pixel lies in exactly one of the tile's left and
    top overlaps (the tile is the top-right or bottom-left one of that corner), so the four weights at every
    corner sum to 256."""
    u = _weights_1d(size, *ov_x)
    v = _weights_1d(size, *ov_y)
    ramps = np.arange(size)
    mixed = (ramps < ov_y[0])[:, None] ^ (ramps < ov_x[0])[None, :]
    return ((v[:, None] * u[None, :] + np.where(mixed, 127, 128)) >> 8).astype(np.uint16)


class Stitcher:
    """Place tile predictions (uint8, `tile_size` square) into a `width` x `height` image, flushing finished
    rows to `sink` in order.

    `tiles` is an (N, 2) or (N, 4) integer array whose first two columns are each tile's top-left corner
    ``lvl_x, lvl_y`` in output pixels; every tile covers ``tile_size`` pixels each way (the part beyond the
    image is dropped). Give every tile index once, in any order and in batches of any size: `add_batch(indices,
    probs)` / `add(i, pixels)` for predicted tiles, `skip_batch(indices)` / `skip(i)` for tiles that will not
    come; then `close()`. Rows no tile covers come out as 0.
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
        t = self.tile_size
        self.xy = tiles[:, :2].astype(np.int64)
        n = len(self.xy)
        x, y = self.xy[:, 0], self.xy[:, 1]
        kx0, kx1, ox0, ox1 = _axis_cells(x, t, self.width) if n else (x,) * 4
        ky0, ky1, oy0, oy1 = _axis_cells(y, t, self.height) if n else (y,) * 4
        if mode == "crop":
            self.cols = np.stack([kx0, kx1], axis=1).reshape(n, 2)
            self.rows = np.stack([ky0, ky1], axis=1).reshape(n, 2)
        else:
            self.cols = np.stack([np.maximum(0, x), np.minimum(self.width, x + t)], axis=1).reshape(n, 2)
            self.rows = np.stack([np.maximum(0, y), np.minimum(self.height, y + t)], axis=1).reshape(n, 2)
        overlaps = np.stack([ox0, ox1, oy0, oy1], axis=1).reshape(n, 4)
        # crop, and blend where no two tiles overlap (every weight 1): copies into a uint8 band
        self.plain = mode == "crop" or not overlaps.any()
        if self.plain:
            self._weights = np.zeros((0, t, t), np.uint16)
            self._wid = np.zeros(n, np.int64)
        else:  # one weight tile per edge configuration (9 on a regular grid)
            configs, wid = np.unique(overlaps, axis=0, return_inverse=True)
            self._weights = np.stack([blend_weights(t, (int(a), int(b)), (int(c), int(d)))
                                      for a, b, c, d in configs.tolist()])
            self._wid = wid.reshape(-1).astype(np.int64)
        # tiles in the order their first row comes; the frontier is the first row of the first unfinished one
        self._order = np.argsort(self.rows[:, 0], kind="stable")
        self._first_rows = self.rows[self._order, 0]
        self._done = np.zeros(n, bool)
        self._held = np.zeros(n, bool)  # kept aside in _deferred
        self._cursor = 0
        self.flushed = 0  # rows [0, flushed) have gone to the sink
        # band buffer: rows [flushed, flushed + capacity)
        self._alloc(min(self.height, 2 * t))
        self._deferred: dict[int, np.ndarray] = {}  # tiles that came too far ahead of the band
        self.peak_deferred = 0
        self.tiles_added = 0
        self.tiles_skipped = 0
        self._closed = False

    # -- buffer -----------------------------------------------------------------------------------------
    def _alloc(self, cap: int) -> None:
        self._band_rows = cap
        # plain: the pixels; blend: sum of weight * pixel in 8.8 fixed point (at most 255 * 256)
        self._acc = np.zeros((cap, self.width), np.uint8 if self.plain else np.uint16)

    @property
    def peak_band_rows(self) -> int:
        """Rows the band holds (fixed: two tiles, or the image height if smaller)."""
        return self._band_rows

    @property
    def band_bytes(self) -> int:
        """Bytes held by the band buffer now."""
        return self._acc.nbytes

    @property
    def deferred_bytes(self) -> int:
        """Bytes held by tiles kept aside (out of order) now."""
        return sum(p.nbytes for p in self._deferred.values())

    def _frontier(self) -> int:
        """First row a tile still to come can touch (the image height when none is left)."""
        n = len(self._order)
        while self._cursor < n and self._done[self._order[self._cursor]]:
            self._cursor += 1
        return min(int(self._first_rows[self._cursor]), self.height) if self._cursor < n else self.height

    # -- tiles ------------------------------------------------------------------------------------------
    def _check_indices(self, indices) -> np.ndarray:
        idx = np.asarray(indices)
        if idx.ndim != 1 or (idx.size and not np.issubdtype(idx.dtype, np.integer)):
            raise ConfigError(f"tile indices must be a 1-D integer sequence, got {idx.dtype} {idx.shape}")
        idx = idx.astype(np.int64, copy=False)
        n = len(self.xy)
        out = (idx < 0) | (idx >= n)
        if out.any():
            raise ConfigError(f"tile index {int(idx[out][0])} is outside the grid of {n} tiles")
        again = self._done[idx] | self._held[idx]
        if not again.any() and len(idx) > 1:
            uniq, counts = np.unique(idx, return_counts=True)
            if (counts > 1).any():
                again = idx == uniq[counts > 1][0]
        if again.any():
            i = int(idx[again][0])
            raise ConfigError(f"tile {i} at {tuple(self.xy[i].tolist())} was already stitched: give each tile once")
        if self._closed:
            raise ConfigError("the stitcher is closed: no more tiles can be added")
        return idx

    def add(self, i: int, pixels: np.ndarray) -> None:
        """Stitch tile `i` (a `tile_size` x `tile_size` uint8 array): `add_batch([i], pixels[None])`."""
        t = self.tile_size
        pixels = np.asarray(pixels)
        if pixels.shape != (t, t):
            raise ConfigError(f"tile {int(i)}: got pixels of shape {pixels.shape}, expected ({t}, {t})")
        self.add_batch(np.array([i]), pixels[None])

    def add_batch(self, indices, probs: np.ndarray) -> None:
        """Stitch the tiles `indices` (n,) whose predictions are `probs`, uint8 (n, tile_size, tile_size), in one
        pass (a Cython loop over the batch, GIL released). Tiles too far below the rows still open are kept
        aside (copies) until the band reaches them, so the band never grows."""
        idx = self._check_indices(indices)
        probs = np.asarray(probs)
        t, n = self.tile_size, len(idx)
        if probs.dtype != np.uint8 or probs.shape != (n, t, t):
            raise ConfigError(f"a batch of {n} tiles needs uint8 probabilities of shape ({n}, {t}, {t}), got "
                              f"{probs.dtype} {probs.shape}")
        if n == 0:
            return
        probs = np.ascontiguousarray(probs)
        cap = self._acc.shape[0]
        fits = self.rows[idx, 1] - self.flushed <= cap
        if not fits.all():
            self._flush_to(self._frontier())  # rows above every tile still to come (glass gaps) are final
            fits = self.rows[idx, 1] - self.flushed <= cap
        if fits.all():
            self._place(idx, probs, np.arange(n))
        else:
            for j in np.flatnonzero(~fits).tolist():
                self._deferred[int(idx[j])] = probs[j].copy()
            self._held[idx[~fits]] = True
            self.peak_deferred = max(self.peak_deferred, len(self._deferred))
            slots = np.flatnonzero(fits)
            self._place(idx[slots], probs, slots)
        self._done[idx[fits]] = True
        self._settle()

    def _place(self, idx: np.ndarray, probs: np.ndarray, slots: np.ndarray) -> None:
        """Add tiles `idx` (their pixels: probs[slots]) to the band."""
        if not len(idx):
            return
        x, y = self.xy[idx, 0], self.xy[idx, 1]
        r0, r1 = self.rows[idx, 0], self.rows[idx, 1]
        c0, c1 = self.cols[idx, 0], self.cols[idx, 1]
        live = (r1 > r0) & (c1 > c0)
        if (live & (r0 < self.flushed)).any():  # cannot happen unless the frontier logic is broken
            i = int(idx[live & (r0 < self.flushed)][0])
            raise RuntimeError(f"tile {i} touches row {self.rows[i, 0]}, already flushed up to {self.flushed}")
        cols = [slots, r0 - y, c0 - x, r0 - self.flushed, c0, r1 - r0, c1 - c0]
        if not self.plain:
            cols.insert(1, self._wid[idx])
        boxes = np.stack(cols, axis=1).astype(np.int64)
        boxes[~live, 1:] = 0  # tiles wholly beyond the image: nothing to place
        if self.plain:
            _tiler.stitch_copy(self._acc, probs, boxes)
        else:
            _tiler.stitch_blend(self._acc, probs, self._weights, boxes)
        self.tiles_added += len(idx)

    def skip(self, i: int) -> None:
        """Tile `i` will not come (rejected as glass): its share of the image stays 0."""
        self.skip_batch(np.array([i]))

    def skip_batch(self, indices) -> None:
        """Tiles `indices` will not come (rejected as glass): their share of the image stays 0."""
        idx = self._check_indices(indices)
        if not len(idx):
            return
        self.tiles_skipped += len(idx)
        self._done[idx] = True
        self._settle()

    def _settle(self) -> None:
        """Flush every final row; place the tiles kept aside that the band now reaches; repeat."""
        while True:
            self._flush_to(self._frontier())
            if not self._deferred:
                return
            cap = self._acc.shape[0]
            ready = [j for j in self._deferred if self.rows[j, 1] - self.flushed <= cap]
            if not ready:
                return
            idx = np.array(ready, np.int64)
            self._place(idx, np.stack([self._deferred.pop(j) for j in ready]), np.arange(len(idx)))
            self._held[idx] = False
            self._done[idx] = True

    def _flush_to(self, row: int) -> None:
        count = row - self.flushed
        cap = self._acc.shape[0]
        while count > 0:
            m = min(count, cap)
            if self.plain:
                out = self._acc[:m].copy()
            else:  # round the 8.8 fixed-point sums
                out = np.empty((m, self.width), np.uint8)
                _tiler.fixed_to_u8(self._acc, out)
            self.sink(self.flushed, out)
            _tiler.band_shift(self._acc, m)  # the rest of the band up, the freed rows cleared
            self.flushed += m
            count -= m

    def close(self) -> None:
        """Check every tile came, flush the last rows. Raises ConfigError naming missing tiles."""
        if self._closed:
            return
        missing = np.flatnonzero(~self._done)
        if len(missing):
            raise ConfigError(f"{len(missing)} of {len(self.xy)} tiles were never stitched (first: index "
                              f"{missing[0]} at {tuple(self.xy[missing[0]].tolist())}); add or skip every tile")
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
