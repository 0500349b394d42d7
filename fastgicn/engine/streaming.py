"""Streaming segmentation for scanner pipelines: tiles in as they are scanned, finished mask regions out.

A scanner (or any producer) pushes tiles with their level-0 position in any order; tiles are batched for the
engine; the predictions go to the stitcher of the whole-slide pipeline (`fastgicn.tiling.stitch.Stitcher`, the
one stitcher of the code base: ``"blend"`` by default, or ``"crop"``, exactly as `segment_slide` stitches), and
a region is handed back as soon as no tile still to come can touch it (tiles declared skipped, e.g. glass the
scanner did not image, count as predicting background). The result does not depend on arrival order.

Regions are bands of whole rows (``lvl_x == 0``, the full width), in order from the top, together covering
the area exactly once: for a row-by-row scan, a band comes out as each row of tiles is done. Each holds the
probability of the positive class (`positive_class`, default 1: tumour) as uint8, 255 being p = 1 (the
pipeline's probability map, bit for bit for the same tile predictions) and the label mask (1 where that
probability is >= 128, i.e. p >= 0.5: the argmax of two classes). `MaskRegion.probabilities` gives float32
class probabilities computed from it on demand, for callers of the earlier float API.

Geometry (in pixels of the read level; level-0 = read level x `downsample`): tiles of side T on a grid of
stride s = T - overlap starting at 0, covering width x height (the pipeline's `tile_grid`). Memory: the
stitcher's band (two tiles high by the width, 1 or 2 bytes a pixel) plus the tiles that came too far out of
order, plus one batch of input tiles; never the slide.

`predict` maps a uint8 N x T x T x 3 batch either to uint8 N x T x T (the positive class's probability x 255,
as the pipeline's device runner returns it: nothing more crosses to the host) or to float N x C x T x T class
probabilities, which are quantised here like the pipeline does (``round(255 * p)``).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..errors import ConfigError
from ..tiling.stitch import MODES, Stitcher

_UNSEEN, _QUEUED, _DONE, _SKIPPED = 0, 1, 2, 3


@dataclass
class MaskRegion:
    """A finished band of the mask. Coordinates in pixels of the read level (`lvl_*`); `l0_*` at level 0."""

    lvl_x: int
    lvl_y: int
    probability: np.ndarray     # h x w uint8: p(positive class) x 255, rounded (the pipeline's probability map)
    labels: np.ndarray          # h x w uint8: 1 where probability >= 128 (p >= 0.5), else 0
    downsample: int = 1
    num_classes: int = 2
    positive_class: int = 1
    _coverage: Callable[[], np.ndarray] | None = field(default=None, repr=False, compare=False)

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

    @property
    def coverage(self) -> np.ndarray:
        """h x w uint8: how many predicted (not skipped) tiles the stitcher took each pixel from (computed on
        demand): for "blend" the tiles covering it, for "crop" 1 where its tile was predicted, 0 where skipped."""
        return self._coverage()

    @property
    def probabilities(self) -> np.ndarray:
        """C x h x w float32 class probabilities from the uint8 map (computed on demand, 1/255 steps): the
        positive class is probability / 255; with two classes the other is 1 minus it, with more the rest is
        shared equally among them."""
        p = self.probability.astype(np.float32) / np.float32(255)
        rest = (1.0 - p) / (self.num_classes - 1)
        out = np.repeat(rest[None], self.num_classes, axis=0)
        out[self.positive_class] = p
        return out


class TileStream:
    """Push tiles as they are scanned; get finished `MaskRegion`s (bands of rows) back as soon as they are final.

        stream = engine.stream(width=l0_w, height=l0_h, overlap=64)
        for tile, l0_x, l0_y in scanner:
            for region in stream.push(tile, l0_x, l0_y):
                writer.write(region)
        for region in stream.close():   # runs the last partial batch; unseen tiles count as skipped
            writer.write(region)

    `stitch`: "blend" (default, as `segment_slide`) or "crop". Pushed tiles are copied into the stream's
    batch buffer, so the producer may reuse its own.
    """

    def __init__(self, predict: Callable[[np.ndarray], np.ndarray], *, width: int, height: int, tile_size: int,
                 overlap: int = 0, downsample: int = 1, batch_size: int = 8, num_classes: int = 2,
                 stitch: str = "blend", positive_class: int = 1):
        for name, value in (("width", width), ("height", height), ("tile_size", tile_size),
                            ("downsample", downsample), ("batch_size", batch_size)):
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise ConfigError(f"{name}={value!r}: use a positive integer")
        if not isinstance(overlap, (int, np.integer)) or overlap < 0 or overlap > tile_size // 2:
            raise ConfigError(f"overlap={overlap!r}: use 0..{tile_size // 2} pixels (at most half a tile)")
        if num_classes < 2:
            raise ConfigError(f"num_classes={num_classes!r}: use at least 2")
        if not 0 <= positive_class < num_classes:
            raise ConfigError(f"positive_class={positive_class!r}: use 0..{num_classes - 1}")
        if stitch not in MODES:
            raise ConfigError(f"stitch={stitch!r}: use one of {MODES}")
        self.predict = predict
        self.tile_size, self.overlap, self.downsample = int(tile_size), int(overlap), int(downsample)
        self.stride = self.tile_size - self.overlap
        self.batch_size, self.num_classes = int(batch_size), int(num_classes)
        self.positive_class, self.stitch = int(positive_class), stitch
        self.lvl_width = math.ceil(width / downsample)
        self.lvl_height = math.ceil(height / downsample)
        self.n_cols = self._count(self.lvl_width)
        self.n_rows = self._count(self.lvl_height)
        self._state = np.zeros((self.n_rows, self.n_cols), dtype=np.uint8)
        rows, cols = np.meshgrid(np.arange(self.n_rows), np.arange(self.n_cols), indexing="ij")
        self._lvl_xy = np.stack([cols.ravel(), rows.ravel()], axis=1).astype(np.int64) * self.stride
        self._regions: list[MaskRegion] = []
        self._stitcher = Stitcher(self._lvl_xy, self.lvl_width, self.lvl_height, self.tile_size, self._sink,
                                  mode=stitch)
        t = self.tile_size
        self._batch = np.empty((self.batch_size, t, t, 3), np.uint8)
        self._batch_index = np.empty(self.batch_size, np.int64)
        self._n_pending = 0
        self._closed = False
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
        return self._lvl_xy * self.downsample

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
        self._batch[self._n_pending] = tile
        self._batch_index[self._n_pending] = r * self.n_cols + c
        self._n_pending += 1
        if self._n_pending >= self.batch_size:
            return self._run_batch()
        return []

    def skip(self, l0_x: int, l0_y: int) -> list[MaskRegion]:
        """Declare a grid tile that will never come (background); returns regions this finishes."""
        self._check_open()
        c, r = self._index(l0_x, l0_y)
        if self._state[r, c] != _UNSEEN:
            raise ConfigError(f"tile at level-0 ({l0_x}, {l0_y}) was already pushed or skipped")
        self._state[r, c] = _SKIPPED
        t0 = time.perf_counter()
        self._stitcher.skip(r * self.n_cols + c)
        self.seconds["stitch"] += time.perf_counter() - t0
        return self._take()

    def flush(self) -> list[MaskRegion]:
        """Run the queued partial batch now (lower latency, smaller batch)."""
        self._check_open()
        return self._run_batch() if self._n_pending else []

    def close(self) -> list[MaskRegion]:
        """Flush, count every tile never pushed as skipped, and return all remaining regions."""
        if self._closed:
            return []
        regions = self.flush()
        unseen = np.flatnonzero(self._state.ravel() == _UNSEEN)
        self._state.ravel()[unseen] = _SKIPPED
        self._stitcher.skip_batch(unseen)
        self._stitcher.close()
        self._closed = True
        return regions + self._take()

    def __enter__(self) -> "TileStream":
        return self

    def __exit__(self, *exc) -> None:
        self._closed = True

    @property
    def pending(self) -> int:
        return self._n_pending

    @property
    def done(self) -> bool:
        """Every row of the area has been handed back."""
        return self._stitcher.flushed >= self.lvl_height

    @property
    def band_bytes(self) -> int:
        """Bytes of the stitcher's band (fixed: two tiles high by the width)."""
        return self._stitcher.band_bytes

    @property
    def peak_deferred_tiles(self) -> int:
        """Most tiles held aside at once because they came too far ahead of the band (0 for a row scan)."""
        return self._stitcher.peak_deferred

    # the name fastgicn.bench reports: what the stream held beyond its fixed band
    max_buffered_regions = peak_deferred_tiles

    def _check_open(self) -> None:
        if self._closed:
            raise ConfigError("this TileStream is closed: start a new one (engine.stream(...)) for another area")

    # -- work -----------------------------------------------------------------------------------------------
    def _to_uint8(self, probs, n: int) -> np.ndarray:
        probs = np.asarray(probs)
        t = self.tile_size
        if probs.dtype == np.uint8 and probs.shape == (n, t, t):
            return probs
        expected = (n, self.num_classes, t, t)
        if probs.shape != expected or not np.issubdtype(probs.dtype, np.floating):
            raise ConfigError(f"predict returned {probs.dtype} shape {probs.shape}, expected uint8 {(n, t, t)} or "
                              f"float {expected} (predict returned shape is wrong)")
        p = probs[:, self.positive_class].astype(np.float32, copy=False) * np.float32(255)
        return np.rint(p, out=p).astype(np.uint8)

    def _run_batch(self) -> list[MaskRegion]:
        n, self._n_pending = self._n_pending, 0
        t0 = time.perf_counter()
        probs = self._to_uint8(self.predict(self._batch[:n]), n)
        t1 = time.perf_counter()
        self.seconds["predict"] += t1 - t0
        idx = self._batch_index[:n].copy()
        self._state.ravel()[idx] = _DONE  # before stitching: the sink reads it for coverage
        self._stitcher.add_batch(idx, probs)
        self.tiles_predicted += n
        self.seconds["stitch"] += time.perf_counter() - t1
        return self._take()

    def _take(self) -> list[MaskRegion]:
        out, self._regions = self._regions, []
        return out

    def _sink(self, y0: int, rows: np.ndarray) -> None:
        labels = (rows >= 128).view(np.uint8)
        self._regions.append(MaskRegion(lvl_x=0, lvl_y=int(y0), probability=rows, labels=labels,
                                        downsample=self.downsample, num_classes=self.num_classes,
                                        positive_class=self.positive_class,
                                        _coverage=self._coverage_of(int(y0), len(rows))))

    def _coverage_of(self, y0: int, h: int) -> Callable[[], np.ndarray]:
        """Coverage of rows y0 .. y0 + h. Every tile whose stitched area touches them is final once they are
        flushed, so the boxes of the predicted ones are taken now and painted only if asked for."""
        st = self._stitcher
        hit = ((st.rows[:, 0] < y0 + h) & (st.rows[:, 1] > y0) & (st.cols[:, 1] > st.cols[:, 0])
               & (self._state.ravel() == _DONE))
        boxes = np.concatenate([st.rows[hit], st.cols[hit]], axis=1).tolist()
        w = self.lvl_width

        def coverage() -> np.ndarray:
            out = np.zeros((h, w), np.uint8)
            for r0, r1, c0, c1 in boxes:
                out[max(r0, y0) - y0:min(r1, y0 + h) - y0, c0:c1] += 1
            return out

        return coverage
