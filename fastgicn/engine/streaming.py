"""Streaming segmentation for scanner pipelines: tiles in as they are scanned, finished mask regions out.

A scanner (or any producer) pushes tiles with their level-0 position in any order; tiles are batched for the
engine; each tile's class probabilities are accumulated into the regions it overlaps, and a region is handed
back as soon as every tile that overlaps it is done (or declared skipped, e.g. glass the scanner did not
image). Overlapping predictions are averaged (uniform blend), so the result does not depend on arrival order.

Geometry (in pixels of the read level; level-0 = read level x `downsample`): tiles of side T on a grid of
stride s = T - overlap starting at 0, covering width x height. The plane is cut into regions, one per tile:
region (c, r) is [c*s, (c+1)*s) x [r*s, (r+1)*s), the last column/row extended to the slide edge. A region is
overlapped by tiles (c, r) and, when overlap > 0, by (c-1, r), (c, r-1), (c-1, r-1); those are what it waits
for. Memory: only regions with some but not all of their tiles done are held (about two rows of regions for a
row-by-row scan), never the slide.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..errors import ConfigError

_UNSEEN, _QUEUED, _DONE, _SKIPPED = 0, 1, 2, 3


@dataclass
class MaskRegion:
    """A finished part of the mask. Coordinates in pixels of the read level (`lvl_*`); `l0_*` at level 0."""

    lvl_x: int
    lvl_y: int
    labels: np.ndarray          # h x w uint8 class indices (argmax of the averaged probabilities)
    probabilities: np.ndarray   # C x h x w float32 averaged class probabilities
    coverage: np.ndarray        # h x w uint8: how many tiles predicted each pixel (0: only skipped tiles)
    downsample: int = 1
    t_col: int = 0
    t_row: int = 0

    @property
    def width(self) -> int:
        return int(self.labels.shape[1])

    @property
    def height(self) -> int:
        return int(self.labels.shape[0])

    @property
    def l0_x(self) -> int:
        return self.lvl_x * self.downsample

    @property
    def l0_y(self) -> int:
        return self.lvl_y * self.downsample


class TileStream:
    """Push tiles as they are scanned; get finished `MaskRegion`s back as soon as their neighbours are done.

        stream = engine.stream(width=l0_w, height=l0_h, overlap=64)
        for tile, l0_x, l0_y in scanner:
            for region in stream.push(tile, l0_x, l0_y):
                writer.write(region)
        for region in stream.close():   # runs the last partial batch; unseen tiles count as skipped
            writer.write(region)

    `predict` maps a uint8 N x T x T x 3 batch to float32 N x C x T x T class probabilities (`Engine.stream`
    passes `engine.predict(..., output="probabilities")`).
    """

    def __init__(self, predict: Callable[[np.ndarray], np.ndarray], *, width: int, height: int, tile_size: int,
                 overlap: int = 0, downsample: int = 1, batch_size: int = 8, num_classes: int = 2):
        for name, value in (("width", width), ("height", height), ("tile_size", tile_size),
                            ("downsample", downsample), ("batch_size", batch_size)):
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise ConfigError(f"{name}={value!r}: use a positive integer")
        if not isinstance(overlap, (int, np.integer)) or overlap < 0 or overlap > tile_size // 2:
            raise ConfigError(f"overlap={overlap!r}: use 0..{tile_size // 2} pixels (at most half a tile)")
        if num_classes < 2:
            raise ConfigError(f"num_classes={num_classes!r}: use at least 2")
        self.predict = predict
        self.tile_size, self.overlap, self.downsample = int(tile_size), int(overlap), int(downsample)
        self.stride = self.tile_size - self.overlap
        self.batch_size, self.num_classes = int(batch_size), int(num_classes)
        self.lvl_width = math.ceil(width / downsample)
        self.lvl_height = math.ceil(height / downsample)
        self.n_cols = self._count(self.lvl_width)
        self.n_rows = self._count(self.lvl_height)
        self._state = np.zeros((self.n_rows, self.n_cols), dtype=np.uint8)
        self._emitted = np.zeros((self.n_rows, self.n_cols), dtype=bool)
        self._pending: list[tuple[np.ndarray, int, int]] = []
        self._buffers: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
        self._closed = False
        self.max_buffered_regions = 0
        self.seconds = {"predict": 0.0, "stitch": 0.0}
        self.tiles_predicted = 0

    def _count(self, side: int) -> int:
        if side <= self.tile_size:
            return 1
        return math.ceil((side - self.tile_size) / self.stride) + 1

    # -- geometry -------------------------------------------------------------------------------------------
    @property
    def grid_shape(self) -> tuple[int, int]:
        """(rows, cols) of the tile grid."""
        return self.n_rows, self.n_cols

    def tile_positions(self) -> np.ndarray:
        """(N, 2) level-0 (l0_x, l0_y) of every grid tile, row-major: where the producer should read tiles."""
        rows, cols = np.meshgrid(np.arange(self.n_rows), np.arange(self.n_cols), indexing="ij")
        step = self.stride * self.downsample
        return np.stack([cols.ravel() * step, rows.ravel() * step], axis=1)

    def _region_bounds(self, c: int, r: int) -> tuple[int, int, int, int]:
        x0, y0 = c * self.stride, r * self.stride
        x1 = (c + 1) * self.stride if c < self.n_cols - 1 else self.lvl_width
        y1 = (r + 1) * self.stride if r < self.n_rows - 1 else self.lvl_height
        return x0, y0, x1, y1

    def _deps(self, c: int, r: int):
        back = 1 if self.overlap else 0
        for rr in range(max(0, r - back), r + 1):
            for cc in range(max(0, c - back), c + 1):
                yield cc, rr

    def _touched(self, c: int, r: int):
        """Regions tile (c, r) overlaps: its own and, with overlap, right / below / diagonal."""
        fwd = 1 if self.overlap else 0
        for rr in range(r, min(self.n_rows, r + fwd + 1)):
            for cc in range(c, min(self.n_cols, c + fwd + 1)):
                yield cc, rr

    def _index(self, l0_x: int, l0_y: int) -> tuple[int, int]:
        step = self.stride * self.downsample
        if l0_x % step or l0_y % step:
            raise ConfigError(f"tile at level-0 ({l0_x}, {l0_y}) is off the grid: positions must be multiples of "
                              f"the stride {self.stride} x downsample {self.downsample} = {step}")
        c, r = int(l0_x // step), int(l0_y // step)
        if not (0 <= c < self.n_cols and 0 <= r < self.n_rows):
            raise ConfigError(f"tile at level-0 ({l0_x}, {l0_y}) is outside the {self.n_cols} x {self.n_rows} "
                              f"tile grid of this {self.lvl_width * self.downsample} x "
                              f"{self.lvl_height * self.downsample} area")
        return c, r

    # -- producer side --------------------------------------------------------------------------------------
    def push(self, tile, l0_x: int, l0_y: int) -> list[MaskRegion]:
        """Queue one uint8 T x T x 3 tile; returns the regions finished by the batch this push completed."""
        self._check_open()
        tile = np.asarray(tile)
        t = self.tile_size
        if tile.dtype != np.uint8 or tile.shape != (t, t, 3):
            raise ConfigError(f"tile of shape {tile.shape} and dtype {tile.dtype}: expected uint8 {t} x {t} x 3 "
                              "(pad edge tiles to the full size; the padding is cropped from the mask)")
        c, r = self._index(l0_x, l0_y)
        if self._state[r, c] != _UNSEEN:
            raise ConfigError(f"tile at level-0 ({l0_x}, {l0_y}) was already pushed or skipped")
        self._state[r, c] = _QUEUED
        self._pending.append((tile, c, r))
        if len(self._pending) >= self.batch_size:
            return self._run_batch()
        return []

    def skip(self, l0_x: int, l0_y: int) -> list[MaskRegion]:
        """Declare a grid tile that will never come (background); returns regions this finishes."""
        self._check_open()
        c, r = self._index(l0_x, l0_y)
        if self._state[r, c] != _UNSEEN:
            raise ConfigError(f"tile at level-0 ({l0_x}, {l0_y}) was already pushed or skipped")
        self._state[r, c] = _SKIPPED
        return self._collect(self._touched(c, r))

    def flush(self) -> list[MaskRegion]:
        """Run the queued partial batch now (lower latency, smaller batch)."""
        self._check_open()
        return self._run_batch() if self._pending else []

    def close(self) -> list[MaskRegion]:
        """Flush, count every tile never pushed as skipped, and return all remaining regions."""
        regions = self.flush() if not self._closed else []
        self._state[self._state == _UNSEEN] = _SKIPPED
        rows, cols = np.nonzero(~self._emitted)
        regions += self._collect(zip(cols.tolist(), rows.tolist()))
        self._closed = True
        return regions

    def __enter__(self) -> "TileStream":
        return self

    def __exit__(self, *exc) -> None:
        self._closed = True

    @property
    def pending(self) -> int:
        return len(self._pending)

    @property
    def done(self) -> bool:
        return bool(self._emitted.all())

    def _check_open(self) -> None:
        if self._closed:
            raise ConfigError("this TileStream is closed: start a new one (engine.stream(...)) for another area")

    # -- work -----------------------------------------------------------------------------------------------
    def _run_batch(self) -> list[MaskRegion]:
        batch, self._pending = self._pending, []
        t0 = time.perf_counter()
        probs = np.asarray(self.predict(np.stack([tile for tile, _, _ in batch])))
        t1 = time.perf_counter()
        self.seconds["predict"] += t1 - t0
        expected = (len(batch), self.num_classes, self.tile_size, self.tile_size)
        if probs.shape != expected:
            raise ConfigError(f"predict returned shape {probs.shape}, expected {expected}")
        touched = []
        for (_, c, r), p in zip(batch, probs):
            self._accumulate(c, r, p)
            self._state[r, c] = _DONE
            touched.extend(self._touched(c, r))
        self.tiles_predicted += len(batch)
        regions = self._collect(touched)
        self.seconds["stitch"] += time.perf_counter() - t1
        return regions

    def _accumulate(self, c: int, r: int, p: np.ndarray) -> None:
        tx0, ty0 = c * self.stride, r * self.stride
        for cc, rr in self._touched(c, r):
            x0, y0, x1, y1 = self._region_bounds(cc, rr)
            ix0, iy0 = max(x0, tx0), max(y0, ty0)
            ix1, iy1 = min(x1, tx0 + self.tile_size), min(y1, ty0 + self.tile_size)
            if ix0 >= ix1 or iy0 >= iy1:
                continue
            buf = self._buffers.get((cc, rr))
            if buf is None:
                buf = (np.zeros((self.num_classes, y1 - y0, x1 - x0), dtype=np.float32),
                       np.zeros((y1 - y0, x1 - x0), dtype=np.uint8))
                self._buffers[(cc, rr)] = buf
                self.max_buffered_regions = max(self.max_buffered_regions, len(self._buffers))
            total, count = buf
            total[:, iy0 - y0:iy1 - y0, ix0 - x0:ix1 - x0] += p[:, iy0 - ty0:iy1 - ty0, ix0 - tx0:ix1 - tx0]
            count[iy0 - y0:iy1 - y0, ix0 - x0:ix1 - x0] += 1

    def _collect(self, candidates) -> list[MaskRegion]:
        out = []
        for c, r in sorted(set(candidates), key=lambda cr: (cr[1], cr[0])):
            if self._emitted[r, c]:
                continue
            if all(self._state[rr, cc] in (_DONE, _SKIPPED) for cc, rr in self._deps(c, r)):
                out.append(self._emit(c, r))
        return out

    def _emit(self, c: int, r: int) -> MaskRegion:
        x0, y0, x1, y1 = self._region_bounds(c, r)
        buf = self._buffers.pop((c, r), None)
        if buf is None:  # only skipped tiles here: background
            count = np.zeros((y1 - y0, x1 - x0), dtype=np.uint8)
            probs = np.zeros((self.num_classes, y1 - y0, x1 - x0), dtype=np.float32)
        else:
            total, count = buf
            probs = total / np.maximum(count, 1)[None]
        probs[0][count == 0] = 1.0  # nothing predicted it: background with certainty
        self._emitted[r, c] = True
        return MaskRegion(lvl_x=x0, lvl_y=y0, labels=probs.argmax(axis=0).astype(np.uint8), probabilities=probs,
                          coverage=count, downsample=self.downsample, t_col=c, t_row=r)
