"""What a segmented slide leaves behind, each file written under a temporary name and renamed when complete.

- `PyramidBandWriter`: a pyramidal tiled TIFF (uint8, one channel) fed a band of rows at a time, as the stitcher
  finishes them: `fastgicn.outputs.tiff.PyramidWriter` with the maps' deflate level; tiles are encoded
  by a pool of threads shared by both maps, so the stitched image is never held whole and compression keeps
  up with the network.
- `LowRes`: block averages of the stitched rows at a reduced scale, for polygons, the overlay and areas.
- `write_overlay_png`, `write_json`: atomic small-file writers. The tumour polygons and their GeoJSON are in
  `fastgicn.outputs.polygons` (OpenCV contours, valid under shapely).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
from pathlib import Path

import numpy as np
from scipy import ndimage

from ..errors import ConfigError, SlideError
from .tiff import PyramidWriter

TUMOR_CLASS = "Tumor"
TUMOR_COLOR = (200, 0, 0)  # QuPath's default red for "Tumor"


# ---------------------------------------------------------------------------------------------------
# atomic files

def temp_name(path: Path) -> Path:
    """The hidden temporary name a file is written under before it is renamed to `path`."""
    return path.with_name(f".{path.name}.{secrets.token_hex(4)}.partial")


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; rename it to `path` when the block succeeds, delete it otherwise."""
    path = Path(path)
    if not path.parent.is_dir():
        raise SlideError(f"cannot write {path}: directory {path.parent} does not exist; create it first")
    tmp = temp_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as exc:
        raise SlideError(f"cannot write {path}: {exc.strerror or exc}; check free space and permissions "
                         f"in {path.parent}") from exc
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def write_json(path, obj) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "w") as fh:
            json.dump(obj, fh, indent=2, default=_json_default)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
    return path


def _json_default(obj):
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot write {type(obj).__name__} to JSON")


def remove_partials(directory, name: str) -> list[Path]:
    """Delete temporary files a killed run left for output `name` in `directory` (ours and the TIFF writer's)."""
    removed = []
    for p in Path(directory).glob(f".{name}.*"):
        if p.suffix in (".partial", ".spool") and p.is_file():
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
                removed.append(p)
    return removed


# ---------------------------------------------------------------------------------------------------
# streaming pyramidal TIFF

# Deflate level of the segmentation maps (probability and mask), chosen by measurement on a probability map
# of the demo slide (bench/bench_writers.py; docs/outputs.md): level 1 encodes several times faster than
# the codec default of 6 for a few percent more bytes.
MAP_DEFLATE_LEVEL = 1


class PyramidBandWriter(PyramidWriter):
    """Stream a `width` x `height` single-channel uint8 image into a pyramidal tiled TIFF, rows in order.

    `write_rows(y0, rows)` takes the next rows (y0 must follow the previous call); `close()` waits for the file
    to be complete and renamed into place; `abort()` discards it. Tiles are encoded by `pool` (None: the pool
    shared by every writer open at once, sized to the usable cores; see `fastgicn.outputs.tiff`).
    `downsample` is "mean" for probabilities and "majority" for 0/255 labels; `compression_level` the deflate
    level (default `MAP_DEFLATE_LEVEL`). Memory: about ``(queue_bands + 3) * tile * width`` bytes;
    `write_rows` blocks while the writer is behind.
    """

    def __init__(self, path, width: int, height: int, *, mpp: float | None = None, tile: int = 256,
                 compression: str = "deflate", downsample: str = "mean", description: str | None = None,
                 queue_bands: int = 1, compression_level: int | None = None, pool=None,
                 min_level_size: int = 1024):
        if compression_level is None and compression == "deflate":
            compression_level = MAP_DEFLATE_LEVEL
        super().__init__(path, width, height, channels=1, tile=tile, compression=compression,
                         compression_level=compression_level, downsample=downsample, mpp=mpp,
                         description=description, min_level_size=min_level_size, pool=pool,
                         queue_bands=queue_bands)


# ---------------------------------------------------------------------------------------------------
# reduced-scale summary of the stitched rows

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
        self._acc = np.zeros(self.width, np.uint64)
        self._rows_in_block = 0
        self._next = 0
        self.count_threshold = count_threshold
        self.count = 0  # pixels >= count_threshold seen so far

    def add(self, y0: int, rows: np.ndarray) -> None:
        if y0 != self._next:
            raise ConfigError(f"LowRes rows must come in order: got {y0}, expected {self._next}")
        self._next += len(rows)
        blank = not rows.any()  # glass gaps: nothing to count or add, only the bookkeeping
        if not blank:
            self.count += int(np.count_nonzero(rows >= self.count_threshold))
        i = 0
        f = self.factor
        while i < len(rows):
            y = y0 + i
            block = y // f
            block_end = min((block + 1) * f, self.height)
            take = min(len(rows) - i, block_end - y)
            if not blank:
                self._acc += rows[i:i + take].sum(axis=0, dtype=np.uint64)
            self._rows_in_block += take
            i += take
            if y + take == block_end:
                sums = np.add.reduceat(self._acc, self._col_starts)
                self.out[block] = np.rint(sums / (self._col_counts * self._rows_in_block))
                self._acc[:] = 0
                self._rows_in_block = 0

    def result(self) -> np.ndarray:
        if self._next != self.height:
            raise ConfigError(f"LowRes got {self._next} of {self.height} rows")
        return self.out


def lowres_factor(width: int, height: int, max_side: int) -> int:
    """The smallest power of two f with ceil(max(width, height) / f) <= max_side."""
    f = 1
    while math.ceil(max(width, height) / f) > max_side:
        f *= 2
    return f


# ---------------------------------------------------------------------------------------------------
# overlay

def overlay_image(thumbnail: np.ndarray, mask: np.ndarray, color=TUMOR_COLOR, alpha: float = 0.45) -> np.ndarray:
    """The thumbnail (h, w, 3) tinted with `color` where `mask` is set, tumour outlines drawn solid.
    Integer arithmetic, a band of rows at a time (temporaries stay small for large thumbnails)."""
    if thumbnail.shape[:2] != mask.shape:
        raise ConfigError(f"thumbnail {thumbnail.shape[:2]} and mask {mask.shape} differ in size")
    mask = mask.astype(bool)
    out = np.array(thumbnail[..., :3], np.uint8, copy=True)
    a = int(round(alpha * 256))
    c = np.asarray(color, np.uint16) * a + 128
    edge = mask & ~ndimage.binary_erosion(mask, border_value=0)
    for r in range(0, len(out), 256):
        band, m = out[r:r + 256], mask[r:r + 256]
        band[m] = ((band[m].astype(np.uint16) * (256 - a) + c) >> 8).astype(np.uint8)
        band[edge[r:r + 256]] = color
    return out


def write_overlay_png(path, thumbnail: np.ndarray, mask: np.ndarray, max_side: int = 2048) -> Path:
    """Overlay of the mask on the thumbnail as a PNG, shrunk so its long side is at most `max_side`."""
    from PIL import Image

    img = Image.fromarray(overlay_image(thumbnail, mask))
    if max(img.size) > max_side:
        s = max_side / max(img.size)
        img = img.resize((max(1, round(img.size[0] * s)), max(1, round(img.size[1] * s))), Image.LANCZOS)
    path = Path(path)
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG", optimize=False)
    return path


def write_slide_overlay(path, slide, low: np.ndarray, low_factor: int, level_downsample: float,
                        max_side: int = 2048) -> Path:
    """The overlay PNG of `slide` with the reduced mask `low` (bool; pixel = `low_factor` pixels of the level
    read, whose downsample is `level_downsample`): the mask reduced by block majority by powers of 2 until its
    longer side is at most `max_side`, over the slide read at the same downsample."""
    k = 1
    while max(low.shape) / k > max_side:
        k *= 2
    small = block_majority(low, k)
    thumb = slide.downsampled(max(1, int(round(low_factor * k * level_downsample))))
    if thumb.shape[:2] != small.shape:
        from PIL import Image
        thumb = np.asarray(Image.fromarray(thumb).resize((small.shape[1], small.shape[0]), Image.BOX))
    return write_overlay_png(path, thumb, small, max_side=max_side)


def block_majority(mask: np.ndarray, k: int) -> np.ndarray:
    """k x k blocks of a bool mask -> True where at least half of the block's pixels (edge blocks: of the
    pixels they have) are set. One block row at a time, so temporaries stay small."""
    if k == 1:
        return mask
    h, w = mask.shape
    cols = np.arange(0, w, k)
    col_counts = np.diff(np.append(cols, w))
    out = np.empty((len(range(0, h, k)), len(cols)), bool)
    for i, r in enumerate(range(0, h, k)):
        band = mask[r:r + k]
        sums = np.add.reduceat(band.sum(axis=0, dtype=np.int32), cols)
        out[i] = 2 * sums >= col_counts * len(band)
    return out
