"""What a segmented slide leaves behind, each file written under a temporary name and renamed when complete.

- `PyramidBandWriter`: a pyramidal tiled TIFF (uint8, one channel) fed a band of rows at a time, as the stitcher
  finishes them; it runs `fastgicn.slide.pyramid_tiff.write_pyramid` (which pulls tiles) in a thread, so the
  stitched image is never held whole and compression overlaps the network.
- `LowRes`: block averages of the stitched rows at a reduced scale, for polygons, the overlay and areas.
- `write_overlay_png`, `write_json`: atomic small-file writers. The tumour polygons and their GeoJSON are in
  `fastgicn.slide.polygons` (OpenCV contours, valid under shapely).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import queue
import secrets
import threading
from pathlib import Path

import numpy as np
from scipy import ndimage

from ..errors import ConfigError, SlideError

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

class _Aborted(Exception):
    """Raised inside the writer thread to make write_pyramid discard its temporary file."""


class PyramidBandWriter:
    """Stream a `width` x `height` single-channel uint8 image into a pyramidal tiled TIFF, rows in order.

    `write_rows(y0, rows)` takes the next rows (y0 must follow the previous call); `close()` waits for the file
    to be complete and renamed into place; `abort()` discards it. Memory: about ``(queue_bands + 2) * tile *
    width`` bytes here plus the writer's own band per level; `write_rows` blocks while the writer is behind.
    `downsample` is "mean" for probabilities and "majority" for 0/255 labels (see pyramid_tiff).
    """

    def __init__(self, path, width: int, height: int, *, mpp: float | None = None, tile: int = 256,
                 compression: str = "deflate", downsample: str = "mean", description: str | None = None,
                 queue_bands: int = 1):
        from .pyramid_tiff import write_pyramid

        self.path, self.width, self.height, self.tile = Path(path), int(width), int(height), int(tile)
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, queue_bands))
        self._abort = threading.Event()
        self._error: BaseException | None = None
        self._next_row = 0
        self._band: np.ndarray | None = None
        self._band_top = 0
        self._band_fill = 0
        self.seconds = 0.0  # time the writer thread spent encoding and writing (not waiting for rows)
        self._closed = False
        kwargs = dict(channels=1, tile=self.tile, compression=compression, downsample=downsample, mpp=mpp,
                      description=description)
        self._thread = threading.Thread(target=self._run, args=(write_pyramid, kwargs), daemon=True,
                                        name=f"fastgicn-write-{self.path.name}")
        self._thread.start()

    # writer thread -----------------------------------------------------------------------------------
    def _run(self, write_pyramid, kwargs) -> None:
        import time

        current = {"top": -1, "band": None, "waited": 0.0}

        def read_tile(x, y, w, h):
            if y != current["top"]:
                w0 = time.perf_counter()
                while True:
                    if self._abort.is_set():
                        raise _Aborted()
                    try:
                        top, band = self._queue.get(timeout=0.05)
                        break
                    except queue.Empty:
                        continue
                current["waited"] += time.perf_counter() - w0
                if top != y:
                    raise RuntimeError(f"writer expected the band at row {y}, got {top}")
                current["top"], current["band"] = top, band
            return current["band"][:h, x:x + w]

        t0 = time.perf_counter()
        try:
            write_pyramid(self.path, self.width, self.height, read_tile, **kwargs)
        except _Aborted:
            pass
        except BaseException as exc:  # handed to the main thread by write_rows / close
            self._error = exc
        finally:
            self.seconds = time.perf_counter() - t0 - current["waited"]

    # main thread -------------------------------------------------------------------------------------
    def _put(self, item) -> None:
        while True:
            if self._error is not None:
                raise self._error
            if not self._thread.is_alive():
                raise SlideError(f"the writer of {self.path} stopped unexpectedly")
            try:
                self._queue.put(item, timeout=0.05)
                return
            except queue.Full:
                continue

    def write_rows(self, y0: int, rows: np.ndarray) -> None:
        if self._closed:
            raise ConfigError(f"{self.path}: write_rows after close")
        if y0 != self._next_row:
            raise ConfigError(f"{self.path}: rows must come in order: got row {y0}, expected {self._next_row}")
        if rows.ndim != 2 or rows.shape[1] != self.width or rows.dtype != np.uint8:
            raise ConfigError(f"{self.path}: rows must be uint8 (n, {self.width}), got {rows.dtype} {rows.shape}")
        if y0 + len(rows) > self.height:
            raise ConfigError(f"{self.path}: rows {y0}..{y0 + len(rows)} pass the image height {self.height}")
        if self._error is not None:
            raise self._error
        self._next_row += len(rows)
        i = 0
        while i < len(rows):
            if self._band is None:
                n = min(self.tile, self.height - self._band_top)
                self._band = np.empty((n, self.width), np.uint8)
                self._band_fill = 0
            take = min(len(rows) - i, len(self._band) - self._band_fill)
            self._band[self._band_fill:self._band_fill + take] = rows[i:i + take]
            self._band_fill += take
            i += take
            if self._band_fill == len(self._band):
                self._put((self._band_top, self._band))
                self._band_top += len(self._band)
                self._band = None

    def close(self) -> Path:
        """Wait until the file is complete and in place; raise what went wrong if it is not."""
        if self._closed:
            return self.path
        if self._next_row != self.height:
            self.abort()
            raise ConfigError(f"{self.path}: closed after {self._next_row} of {self.height} rows")
        while self._thread.is_alive():
            self._thread.join(timeout=0.1)
        self._closed = True
        if self._error is not None:
            raise self._error
        return self.path

    def abort(self) -> None:
        """Stop the writer and delete its temporary files; the final name is never created."""
        self._abort.set()
        with contextlib.suppress(queue.Empty):
            while True:
                self._queue.get_nowait()
        self._thread.join()
        self._closed = True


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
