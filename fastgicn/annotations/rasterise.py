"""Polygons -> a level-0 tumour mask, rasterised exactly in bands of rows and streamed into a pyramidal TIFF.

The pixel-centre rule: pixel (col, row) covers [col, col + 1) x [row, row + 1) in level-0 coordinates and is
inside a polygon when its centre (col + 0.5, row + 0.5) is. On a grid of `downsample` level-0 pixels per
pixel, pixel (col, row) is centred on ((col + 0.5) d, (row + 0.5) d). A polygon's inside follows the even-odd
rule over all its rings (outline and holes), as SVG's "evenodd": a hole is cut out, and a
self-intersecting outline alternates. A centre exactly on an edge is inside on left and top edges and
outside on right and bottom ones, so polygons sharing an edge never both claim a pixel. Tumour is the union
of the tumour polygons, minus the union of the exclusion polygons. A mask traced by
`fastgicn.outputs.polygons` (along pixel edges) rasterises back to itself, pixel for pixel.

The engine is a scanline fill: for each row centre, NumPy computes where every edge crosses it (half-open
in y, so a vertex on a row centre is counted once), takes the first pixel whose centre is at or right of
each crossing, sorts them per polygon and row and pairs them into runs (even-odd); OpenCV paints the runs as
horizontal one-pixel lines, which cover exactly their pixels. It is exact in float64. OpenCV's fillPoly
(with `shift`) is not used for the polygons themselves: it also paints pixels the outline merely touches
(about 10 % of the pixels of small random polygons disagree with the centre rule).

Memory: one band of `tile` rows of the full width, plus the writer's few bands
(`fastgicn.outputs.tiff.PyramidBandWriter`), whatever the slide's size; never a full-size array.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ConfigError
from .read import Annotations, read_annotations

__all__ = ["PolygonRaster", "MaskRenderer", "write_mask", "mask_from_annotations", "MaskWritten"]


class PolygonRaster:
    """The union of `regions` (see the module docstring) on a grid of `downsample` level-0 pixels a pixel."""

    def __init__(self, regions, downsample: float = 1.0):
        self.downsample = float(downsample)
        columns, bounds = [], []
        for r, region in enumerate(regions):
            for ring in region.rings:
                a = ring / self.downsample
                b = np.roll(a, -1, axis=0)
                flip = a[:, 1] > b[:, 1]
                lo, hi = np.where(flip[:, None], b, a), np.where(flip[:, None], a, b)
                keep = hi[:, 1] > lo[:, 1]  # horizontal edges cross no row centre
                lo, hi = lo[keep], hi[keep]
                columns.append(np.stack([lo[:, 1], hi[:, 1], lo[:, 0], (hi[:, 0] - lo[:, 0]) /
                                         (hi[:, 1] - lo[:, 1]), np.full(len(lo), r)], axis=1))
            a = np.concatenate(region.rings) / self.downsample
            # grid pixels whose centre can be inside: col + 0.5 in [xmin, xmax], row + 0.5 in [ymin, ymax)
            bounds.append((math.ceil(a[:, 0].min() - 0.5), math.ceil(a[:, 0].max() - 0.5),
                           math.ceil(a[:, 1].min() - 0.5), math.ceil(a[:, 1].max() - 0.5) - 1))
        e = np.concatenate(columns) if columns else np.zeros((0, 5))
        self._ylo, self._xlo, self._slope = e[:, 0], e[:, 2], e[:, 3]
        self._region = e[:, 4].astype(np.int64)
        # each edge crosses the centres of rows first..last: row + 0.5 in [ylo, yhi), so a vertex on a row
        # centre is counted once, by the edge that starts there
        self._first = np.ceil(e[:, 0] - 0.5).astype(np.int64)
        self._last = np.ceil(e[:, 1] - 0.5).astype(np.int64) - 1
        self._bounds = np.array(bounds, np.int64).reshape(-1, 4)  # col0, col1, row0, row1 (inclusive)

    def __len__(self) -> int:
        return len(self._bounds)

    def paint(self, out: np.ndarray, x0: int, y0: int, value: int = 255) -> bool:
        """Set to `value` the pixels of `out` (C-contiguous uint8 h x w: grid pixels x0.., y0..) inside any
        polygon; return whether any polygon's bounding box reached `out`."""
        import cv2

        if out.dtype != np.uint8 or out.ndim != 2 or not out.flags.c_contiguous:
            raise ConfigError(f"PolygonRaster.paint needs a C-contiguous 2-D uint8 array, got {out.dtype} "
                              f"{out.shape}")
        h, w = out.shape
        b = self._bounds
        hit = (b[:, 1] >= x0) & (b[:, 0] < x0 + w) & (b[:, 3] >= y0) & (b[:, 2] < y0 + h)
        if not hit.any():
            return False
        live = np.flatnonzero((self._last >= y0) & (self._first < y0 + h) & hit[self._region])
        if not len(live):
            return True
        first = np.maximum(self._first[live], y0)
        counts = np.minimum(self._last[live], y0 + h - 1) - first + 1
        starts = np.repeat(np.cumsum(counts) - counts, counts)
        rows = np.repeat(first, counts) + (np.arange(int(counts.sum())) - starts)
        x = np.repeat(self._xlo[live], counts) + (rows + 0.5 - np.repeat(self._ylo[live], counts)) * \
            np.repeat(self._slope[live], counts)
        # the first pixel whose centre is at or right of each crossing; clipping keeps the order
        col = np.clip(np.ceil(x - 0.5 - x0), 0, w).astype(np.int64)
        stride = w + 1
        key = (np.repeat(self._region[live], counts) * h + (rows - y0)) * stride + col
        key.sort()
        pairs = key.reshape(-1, 2)  # even-odd: a region crosses every row centre an even number of times
        begin, end = pairs[:, 0] % stride, pairs[:, 1] % stride
        row = (pairs[:, 0] // stride) % h
        keep = end > begin
        if keep.any():
            begin, end, row = begin[keep], end[keep], row[keep]
            runs = np.stack([np.stack([begin, row], 1), np.stack([end - 1, row], 1)], 1).astype(np.int32)
            cv2.polylines(out, runs, False, int(value))  # a horizontal 1-px line is exactly its run
        return True


class MaskRenderer:
    """Tumour (255) and normal (0) pixels of an `Annotations` on a grid of `downsample` level-0 pixels."""

    def __init__(self, annotations: Annotations, downsample: float = 1.0):
        self.tumour = PolygonRaster(annotations.tumour, downsample)
        self.exclusion = PolygonRaster(annotations.exclusion, downsample)
        self._scratch: np.ndarray | None = None

    def render_into(self, out: np.ndarray, x0: int, y0: int) -> bool:
        """Paint `out` (uint8 h x w, zeroed by the caller) at grid origin (x0, y0); True when it holds tumour
        polygons' boxes (False: `out` is untouched, all normal)."""
        if not self.tumour.paint(out, x0, y0):
            return False
        if len(self.exclusion):
            if self._scratch is None or self._scratch.shape != out.shape:
                self._scratch = np.zeros(out.shape, np.uint8)
            else:
                self._scratch[:] = 0
            if self.exclusion.paint(self._scratch, x0, y0):
                np.bitwise_and(out, np.invert(self._scratch, out=self._scratch), out=out)
        return True

    def render(self, x0: int, y0: int, w: int, h: int) -> np.ndarray:
        out = np.zeros((h, w), np.uint8)
        self.render_into(out, x0, y0)
        return out


@dataclass
class MaskWritten:
    """What `write_mask` wrote: the file, its size, the tumour pixel count, warnings, seconds."""

    path: Path
    width: int
    height: int
    tumour_pixels: int
    regions: int
    excluded_regions: int
    warnings: list
    seconds: float
    rasterise_seconds: float


def write_mask(out_path, annotations: Annotations, width: int, height: int, *, mpp: float | None = None,
               tile: int = 256, description: str | None = None, pool=None) -> MaskWritten:
    """Rasterise `annotations` onto a `width` x `height` level-0 grid and stream it, `tile` rows at a time,
    into a lossless (deflate) pyramidal tiled TIFF: 0 normal, 255 tumour, lower levels by 2x2 majority,
    `mpp` as its resolution. The file appears under `out_path` only when complete. Parts outside the slide
    are left out (clipped); `warnings` says which polygons were."""
    from ..outputs.tiff import PyramidBandWriter

    t0 = time.perf_counter()
    warnings = list(annotations.warnings) + annotations.clip_warnings(width, height)
    renderer = MaskRenderer(annotations)
    writer = PyramidBandWriter(out_path, width, height, mpp=mpp, tile=tile, downsample="majority",
                               pool=pool, description=description or
                               f"tumour mask (0 normal, 255 tumour) from {Path(annotations.path).name}")
    tumour_px, raster_s = 0, 0.0
    try:
        for y0 in range(0, height, tile):
            band = np.zeros((min(tile, height - y0), width), np.uint8)
            t1 = time.perf_counter()
            painted = renderer.render_into(band, 0, y0)
            if painted:
                tumour_px += int(np.count_nonzero(band))
            raster_s += time.perf_counter() - t1
            writer.write_rows(y0, band, copy=False, value=None if painted else 0)  # all normal: no look
        writer.close()
    except BaseException:
        writer.abort()
        raise
    return MaskWritten(Path(out_path), int(width), int(height), tumour_px, len(annotations.tumour),
                       len(annotations.exclusion), warnings, time.perf_counter() - t0, raster_s)


def mask_from_annotations(slide_path, annotations_path, out_path, *, tumour_groups=None,
                          exclusion_groups=None, classes=None, exclude_classes=None,
                          max_mb: float | None = None,
                          tile: int = 256) -> MaskWritten:
    """`fastgicn mask`: the level-0 mask of `slide_path` (its size and MPP) from an ASAP XML or QuPath GeoJSON
    file (rules as in `read_annotations`)."""
    from ..slide import open_slide

    slide_path, out_path = Path(slide_path), Path(out_path)
    if out_path.exists() and out_path.resolve() in (slide_path.resolve(), Path(annotations_path).resolve()):
        raise ConfigError(f"-o {out_path}: that is an input; name the mask another file, e.g. "
                          f"{slide_path.stem}.mask.tif")
    annotations = read_annotations(annotations_path, tumour_groups=tumour_groups,
                                   exclusion_groups=exclusion_groups, classes=classes,
                                   exclude_classes=exclude_classes, max_mb=max_mb)
    with open_slide(slide_path) as slide:
        width, height = slide.dimensions
        mpp = slide.mpp
    return write_mask(out_path, annotations, width, height, mpp=mpp, tile=tile,
                      description=f"tumour mask (0 normal, 255 tumour) of {slide_path.name} from "
                                  f"{Path(annotations_path).name}")

