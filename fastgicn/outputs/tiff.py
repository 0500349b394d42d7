"""A streaming writer of pyramidal tiled TIFF that OpenSlide opens (generic tiled TIFF or Aperio-style SVS).

`write_pyramid` pulls level-0 tiles from a callback in row-major order and never holds more than one band of
tiles per level. Levels are in the main IFD chain (not SubIFDs), each half the size of the one above (rounded
up) until the long side is at most `min_level_size`; every lower level is a true 2x2 reduction of the level
above, computed from the exact pixels the callback returned (not from decoded JPEG):

- ``"mean"``: the rounded area average, for RGB slides and probability maps;
- ``"majority"``: 255 where at least 2 of the 4 pixels are >= 128, else 0 (ties keep the foreground), so a
  0/255 label mask stays 0/255 at every level;
- ``"max"``: the largest of the 4, which keeps every foreground pixel visible at low resolution.

At the right and bottom edges of an odd-sized level the 2x2 block is cut by the image border, and the
reduction uses only the pixels that exist (the edge row or column is repeated before reducing).

`level_step=4` (or 8, ...) keeps only some levels of that 2x cascade, as Aperio scanners write them
(downsamples 1, 4, 16, 64, ... until the long side is at most `min_level_size`): the cascade still computes
every 2x level and spools only the kept ones, so a 4x level is the 2x reduction of the 2x reduction (not a
4x4 box mean, which differs by rounding). With `aperio=True` the file can also carry the pages of an Aperio
SVS besides the tiled levels: a stripped `thumbnail` page right after level 0 (the largest 2x level whose
long side is at most 1024 px, or the given size, taken from the cascade, so level 0 is read once) and
stripped `label` (LZW) and `macro` (JPEG) pages at the end, given as arrays or made by the caller from that
low-resolution image. Then every page has an Aperio ImageDescription (``... -> WxH - |AppMag = ...`` for
the thumbnail, ``label WxH`` and ``macro WxH``), the tiled reduced levels have NewSubfileType 0 as Aperio
writes them (tifffile's SVS reader ends the level list at a reduced-image page), the label 1 and the macro 9.
OpenSlide then reports the tiled pages as levels and `thumbnail`, `label`, `macro` as associated images;
tifffile reports `is_svs`, the tiled levels as ``series[0].levels`` and series named Thumbnail, Label, Macro.

Two forms: `write_pyramid` pulls tiles from a callback; `PyramidWriter` is pushed bands of rows (`write_rows`,
`close`, `abort`) and writes on a thread of its own. In both, tiles of every level are encoded by a pool of
threads (imagecodecs releases the GIL; by default one pool of `usable_cpus()` threads shared by every writer
open at once), a few tiles ahead of the file, and written in order: the file is the same byte for byte
whatever the pool. tifffile still writes the TIFF structure, pulling the encoded tiles of a level from an
iterator and patching their offsets into the IFD. A uniform single-channel tile (glass, an all-zero mask) is
encoded once per value and its bytes reused. Deflate uses level `DEFAULT_DEFLATE_LEVEL` (6) unless
`compression_level` says otherwise (the segmentation maps use 1, see `fastgicn.outputs.files`).

Memory: level-0 tiles are encoded as they arrive; lower levels are built in bands of `tile` rows (about
``tile * width * channels`` bytes over all levels, plus the thumbnail-sized image when a thumbnail, label or
macro is asked for, at most about 1024 x 1024 pixels) and their encoded tiles are spooled to a temporary file
beside the output, because TIFF wants each level's tiles after its IFD and level 1 is complete only once
level 0 is. The TIFF is written to a hidden temporary name in the same directory and moved into place with
`os.replace` only when complete, so an interrupted run never leaves a file under the final name; on any error
the temporary files are removed and, when the disk is full, a `SlideError` names the file.
"""
from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import errno
import math
import os
import queue
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import imagecodecs
import numpy as np
import tifffile

from ..cpus import usable_cpus
from ..errors import ConfigError, SlideError

COMPRESSIONS = ("jpeg", "deflate", "lzw")
LOSSLESS_COMPRESSIONS = ("deflate", "lzw")
DOWNSAMPLE_MODES = ("mean", "majority", "max")
# The deflate level when none is given (see DEFAULT_DEFLATE_LEVEL's note in the module docstring).
DEFAULT_DEFLATE_LEVEL = 6
# Rows are reduced in chunks this wide, so temporaries stay small however wide the slide is.
_REDUCE_CHUNK_COLUMNS = 4096
# The first line of every Aperio ImageDescription (the version OpenSlide's test slides and ours carry).
APERIO_LIBRARY = "Aperio Image Library v12.0.15"
THUMBNAIL_SIZE = 1024  # the long side an Aperio thumbnail page has at most
_STRIP_ROWS = 16  # rows per strip of the stripped pages (a multiple of the 2x2-subsampled JPEG MCU)
# NewSubfileType of the stripped pages (tifffile names an SVS page "Macro" by 9, else "Label")
_SUBFILETYPE_LABEL, _SUBFILETYPE_MACRO = 1, 9

ReadTile = Callable[[int, int, int, int], np.ndarray]
LowResImage = Callable[[np.ndarray], np.ndarray]  # the thumbnail-sized level -> a label or macro image


@dataclass(frozen=True)
class PyramidLevel:
    """One level as written: its size in pixels and its downsample from level 0 (width ratio)."""

    width: int
    height: int
    downsample: float


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


def aperio_description(width: int, height: int, tile: int, compression: str, quality: int,
                       mpp: float | None, app_mag: float | None, level_size: tuple[int, int] | None = None,
                       extra: str = "") -> str:
    """ImageDescription in the form OpenSlide's Aperio reader parses (`key = value` fields after `|`)."""
    codec = f"JPEG/RGB Q={quality}" if compression == "jpeg" else compression.upper()
    head = f"{APERIO_LIBRARY}\r\n{width}x{height} [0,0 {width}x{height}] ({tile}x{tile})"
    if level_size is not None:
        head += f" -> {level_size[0]}x{level_size[1]}"
    return "|".join([f"{head} {codec}"] + _aperio_fields(mpp, app_mag, extra))


def aperio_thumbnail_description(width: int, height: int, size: tuple[int, int], mpp: float | None,
                                 app_mag: float | None, extra: str = "") -> str:
    """ImageDescription of an Aperio thumbnail page: ``WxH -> wxh - `` and the slide's fields."""
    head = f"{APERIO_LIBRARY}\r\n{width}x{height} -> {size[0]}x{size[1]} - "
    return "|".join([head] + _aperio_fields(mpp, app_mag, extra))


def aperio_associated_description(name: str, size: tuple[int, int]) -> str:
    """ImageDescription of an Aperio label or macro page; OpenSlide names the image by the word after the
    line break."""
    return f"{APERIO_LIBRARY}\r\n{name} {size[0]}x{size[1]}"


def _aperio_fields(mpp: float | None, app_mag: float | None, extra: str) -> list[str]:
    fields = []
    if app_mag is not None:
        fields.append(f"AppMag = {app_mag:g}")
    if mpp is not None:
        fields.append(f"MPP = {mpp:.6g}")
    if extra:
        fields.append(extra)
    return fields


def _tile_encoder(compression: str, channels: int, quality: int,
                  compression_level: int | None = None) -> Callable[[np.ndarray], bytes]:
    """Encode one full tile exactly as tifffile would for the same compression and photometric tags."""
    if compression == "jpeg" and channels == 3:
        return lambda t: imagecodecs.jpeg8_encode(t, level=quality, colorspace="RGB", outcolorspace="YCBCR",
                                                  subsampling=(2, 2))
    if compression == "jpeg":
        return lambda t: imagecodecs.jpeg8_encode(t, level=quality)
    if compression == "deflate":
        level = DEFAULT_DEFLATE_LEVEL if compression_level is None else compression_level
        return lambda t: imagecodecs.deflate_encode(t, level=level)
    if compression == "lzw":
        return lambda t: imagecodecs.lzw_encode(t)
    raise ConfigError(f"compression {compression!r}: use one of {COMPRESSIONS}")


def uniform_value(block: np.ndarray) -> int | None:
    """The value of a single-channel block whose pixels are all equal, else None."""
    if block.ndim != 2:
        return None
    low = int(block.min())
    return low if low == int(block.max()) else None


class _TileEncoder:
    """Pads and encodes tiles; uniform single-channel tiles (most of a mask) are encoded once per value."""

    def __init__(self, compression: str, channels: int, quality: int, tile: int,
                 compression_level: int | None = None):
        self.encode_full = _tile_encoder(compression, channels, quality, compression_level)
        self.tile, self.channels = tile, channels
        self._uniform: dict[int, bytes] = {}

    def __call__(self, block: np.ndarray, value: int | None = None) -> bytes:
        if value is None and self.channels == 1:
            value = uniform_value(block)
        if value is not None:  # edge padding keeps a uniform tile uniform, so one encoding serves every size
            data = self._uniform.get(value)
            if data is None:  # two pool threads may both encode a value first seen at once: same bytes
                data = self._uniform[value] = self.encode_full(np.full((self.tile, self.tile), value, np.uint8))
            return data
        return self.encode_full(_pad_to_tile(block, self.tile))


def _pad_to_tile(block: np.ndarray, tile: int) -> np.ndarray:
    """TIFF tiles are always full size; repeat the edge so JPEG does not ring against a black border."""
    if block.shape[0] == tile and block.shape[1] == tile:
        return np.ascontiguousarray(block)
    pad = [(0, tile - block.shape[0]), (0, tile - block.shape[1])] + [(0, 0)] * (block.ndim - 2)
    return np.pad(block, pad, mode="edge")


class _Spool:
    """Encoded tiles of the lower levels, parked in a temporary file until their IFD is written."""

    def __init__(self, path: Path, n_levels: int):
        self.path = path
        self.file = open(path, "w+b")
        self.index: list[list[tuple[int, int]]] = [[] for _ in range(n_levels)]
        self.size = 0

    def add(self, level: int, data: bytes) -> None:
        self.file.write(data)
        self.index[level].append((self.size, len(data)))
        self.size += len(data)

    def tiles(self, level: int) -> Iterator[bytes]:
        self.file.flush()
        fd = self.file.fileno()
        for offset, length in self.index[level]:
            yield os.pread(fd, length, offset)

    def close(self) -> None:
        self.file.close()


class _Cascade:
    """Builds levels 1..n from level-0 tiles: one band of `tile` rows per level, reduced 2x2 into the next.

    `sizes` are every 2x level computed; the tiles of those in `keep` (indices into `sizes`) are handed to
    `emit(level, block)` in row-major order (a copy of its own, so `emit` may encode it later, on another
    thread), and level `collect` (if not None) is also gathered whole into `overview`."""

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
            for x in range(0, width, self.tile):  # a copy: the band is filled again while the tile waits
                self.emit(level, np.array(band[:, x:x + self.tile], copy=True))
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
                small = downsample2(band[:, x:x + _REDUCE_CHUNK_COLUMNS], self.mode)
                below[y:y + small.shape[0], x // 2:x // 2 + small.shape[1]] = small
            self._add_rows(level + 1, (band_rows + 1) // 2)

    def check_complete(self) -> None:
        for level in sorted(self.keep):
            w, h = self.sizes[level]
            expected = math.ceil(w / self.tile) * math.ceil(h / self.tile)
            if self.emitted[level] != expected:
                raise RuntimeError(f"pyramid level {level}: {self.emitted[level]} tiles built, "
                                   f"expected {expected}")


def reduce_tile(pixels: np.ndarray, value: int | None, mode: str) -> np.ndarray:
    """The 2x2 reduction of a level-0 tile; a uniform tile (`value`) reduces to the same value in every mode
    (majority: 255 or 0)."""
    if value is None:
        return downsample2(pixels, mode)
    reduced = value if mode != "majority" else (255 if value >= 128 else 0)
    return np.full(((pixels.shape[0] + 1) // 2, (pixels.shape[1] + 1) // 2), reduced, np.uint8)


def _validate(width, height, channels, tile, compression, quality, downsample, mpp, app_mag, min_level_size):
    for name, value in (("width", width), ("height", height), ("tile", tile),
                        ("min_level_size", min_level_size)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
            raise ConfigError(f"{name}={value!r}: must be a positive integer")
    if width >= 2**32 or height >= 2**32:
        raise ConfigError(f"size {width}x{height}: TIFF allows at most {2**32 - 1} pixels a side")
    if tile % 16 or tile > 4096:
        raise ConfigError(f"tile={tile}: TIFF tiles must be a multiple of 16 (at most 4096); "
                          "256 or 512 are usual")
    if channels not in (1, 3):
        raise ConfigError(f"channels={channels!r}: use 3 for RGB or 1 for a mask or probability map")
    if compression not in COMPRESSIONS:
        raise ConfigError(f"compression {compression!r}: use one of {COMPRESSIONS}")
    if downsample not in DOWNSAMPLE_MODES:
        raise ConfigError(f"downsample {downsample!r}: use one of {DOWNSAMPLE_MODES}")
    if downsample != "mean" and compression not in LOSSLESS_COMPRESSIONS:
        raise ConfigError(f"downsample {downsample!r} is for label masks, which need lossless compression: "
                          f"use compression 'deflate' or 'lzw', not {compression!r}")
    if compression == "jpeg" and not 1 <= quality <= 100:
        raise ConfigError(f"quality={quality!r}: JPEG quality must be 1..100 (90 is a good default)")
    if mpp is not None and not (math.isfinite(mpp) and mpp > 0):
        raise ConfigError(f"mpp={mpp!r}: microns per pixel must be a positive number (0.25 is about 40x)")
    if app_mag is not None and not (math.isfinite(app_mag) and app_mag > 0):
        raise ConfigError(f"app_mag={app_mag!r}: the objective magnification must be positive (e.g. 40)")


def _validate_aperio_pages(aperio, level_step, thumbnail, label, macro) -> int | None:
    """Checks the Aperio layout keywords; returns the thumbnail's largest long side (None: no thumbnail)."""
    _halvings(level_step)
    if isinstance(thumbnail, bool):
        thumb_size = THUMBNAIL_SIZE if thumbnail else None
    elif isinstance(thumbnail, (int, np.integer)) and thumbnail >= 16:
        thumb_size = int(thumbnail)
    else:
        raise ConfigError(f"thumbnail={thumbnail!r}: use True (long side at most {THUMBNAIL_SIZE} px), "
                          "False, or the largest long side in pixels (at least 16)")
    for name, value in (("thumbnail", thumb_size), ("label", label), ("macro", macro)):
        if value is not None and not aperio:
            raise ConfigError(f"{name}: thumbnail, label and macro pages belong to the Aperio SVS layout; "
                              "pass aperio=True (or leave them out of a generic TIFF)")
    for name, value in (("label", label), ("macro", macro)):
        if value is not None and not callable(value):
            _check_associated(name, value)
    return thumb_size


def _check_associated(name: str, image) -> np.ndarray:
    """A label or macro image: uint8, H x W or H x W x 3, at most 65535 px a side."""
    image = np.asarray(image)
    if (image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] != 3)
            or min(image.shape[:2]) < 1 or max(image.shape[:2]) > 65535):
        raise ConfigError(f"{name} image {image.dtype} {image.shape}: give uint8 pixels, H x W x 3 (RGB) or "
                          "H x W, at most 65535 px a side (or a function of the low-resolution slide image "
                          "that returns them)")
    return np.ascontiguousarray(image)


class _SourceFailed(Exception):
    """Carries an OSError raised by `read_tile` past the handler for write errors (it is re-raised as is)."""

    def __init__(self, error: OSError):
        super().__init__(str(error))
        self.error = error


def _check_tile(pixels, l0_x, l0_y, w, h, channels) -> np.ndarray:
    pixels = np.asarray(pixels)
    expected = (h, w, channels) if channels > 1 else (h, w)
    if pixels.shape != expected or pixels.dtype != np.uint8:
        raise ConfigError(f"read_tile({l0_x}, {l0_y}, {w}, {h}) returned {pixels.dtype} {pixels.shape}: "
                          f"it must return uint8 of shape {expected}")
    return pixels


def _stripped_codec(compression: str, quality: int, image: np.ndarray) -> dict:
    """tifffile arguments that compress a stripped page (JPEG RGB as YCbCr 2x2, like the tiles)."""
    if compression == "jpeg":
        codec = dict(compression="jpeg", compressionargs={"level": quality})
        if image.ndim == 3:
            codec["subsampling"] = (2, 2)
        return codec
    return dict(compression=compression)


def _open_output(path: Path):
    """The temporary output file (a seam the tests use to simulate a full disk)."""
    return open(path, "wb")


def _remove_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


# ---------------------------------------------------------------------------------------------------
# the encoding pool

_POOL_LOCK = threading.Lock()
_SHARED_POOL: dict = {"pool": None, "users": 0}


def _acquire_pool(pool) -> tuple[Executor, Callable[[], None]]:
    """The executor that encodes tiles and a function that gives it back (idempotent).

    None: the process-wide pool of `usable_cpus()` threads, shared by every writer open at the same time
    (the probability map and the mask of a slide) and shut down when the last of them gives it back; an
    int n >= 1: a pool of n threads for this writer alone; an `Executor`: used as it is, never shut down."""
    if isinstance(pool, Executor):
        return pool, lambda: None
    if pool is None:
        with _POOL_LOCK:
            if _SHARED_POOL["pool"] is None:
                _SHARED_POOL["pool"] = ThreadPoolExecutor(usable_cpus(), thread_name_prefix="fastgicn-encode")
            _SHARED_POOL["users"] += 1
            executor = _SHARED_POOL["pool"]
        released = []

        def release_shared() -> None:
            with _POOL_LOCK:
                if released:
                    return
                released.append(True)
                _SHARED_POOL["users"] -= 1
                last = _SHARED_POOL["users"] == 0 and _SHARED_POOL["pool"] is executor
                if last:
                    _SHARED_POOL["pool"] = None
            if last:
                executor.shutdown(wait=True)

        return executor, release_shared
    if isinstance(pool, bool) or not isinstance(pool, (int, np.integer)) or pool < 1:
        raise ConfigError(f"pool={pool!r}: give a number of encoding threads (>= 1), a "
                          "concurrent.futures.Executor, or None for the shared pool sized to the usable cores")
    executor = ThreadPoolExecutor(int(pool), thread_name_prefix="fastgicn-encode")
    return executor, lambda: executor.shutdown(wait=True)


def _pool_threads(executor: Executor) -> int:
    return int(getattr(executor, "_max_workers", 0) or usable_cpus())


def _encode_level0(encode: _TileEncoder, pixels: np.ndarray, mode: str | None):
    """Pool task for one level-0 tile: (encoded bytes, its 2x2 reduction or None, seconds)."""
    t0 = time.perf_counter()
    value = uniform_value(pixels)
    small = None if mode is None else reduce_tile(pixels, value, mode)
    return encode(pixels, value), small, time.perf_counter() - t0


def _encode_timed(encode: _TileEncoder, block: np.ndarray):
    t0 = time.perf_counter()
    return encode(block), time.perf_counter() - t0


class _LowerLevels:
    """Encodes the tiles of levels 1..n on the pool and spools them in the order they were emitted."""

    def __init__(self, executor: Executor, encode: _TileEncoder, spool: _Spool, limit: int, stats: dict):
        self.executor, self.encode, self.spool, self.limit, self.stats = executor, encode, spool, limit, stats
        self.pending: collections.deque = collections.deque()

    def emit(self, level: int, block: np.ndarray) -> None:
        self.pending.append((level, self.executor.submit(_encode_timed, self.encode, block)))
        while self.pending and (len(self.pending) > self.limit or self.pending[0][1].done()):
            self._spool_first()

    def _spool_first(self) -> None:
        level, future = self.pending.popleft()
        data, seconds = _result(future, self.stats)
        self.stats["encode_seconds"] += seconds
        self.spool.add(level, data)

    def drain(self) -> None:
        while self.pending:
            self._spool_first()


def _result(future, stats: dict):
    if future.done():
        return future.result()
    t0 = time.perf_counter()
    try:
        return future.result()
    finally:
        stats["wait_seconds"] += time.perf_counter() - t0


def _cancel(futures) -> None:
    """Cancel what has not started and wait for what has (no task outlives its writer)."""
    futures = [f for f in futures if not f.cancel()]
    if futures:
        concurrent.futures.wait(futures)


Level0Tiles = Iterator[tuple[int, int, np.ndarray]]  # (t_row, t_col, pixels) in row-major order


@dataclass
class _Plan:
    """Everything `write_pyramid` and `PyramidWriter` decide before writing a byte."""

    path: Path
    directory: Path
    width: int
    height: int
    channels: int
    tile: int
    sizes: list  # every 2x level the cascade computes
    kept: list  # sizes of the levels written
    keep: list  # their indices in `sizes`
    collect: int | None
    bigtiff: bool
    options: dict  # compression, quality, downsample, mpp, aperio, app_mag, description, thumbnail, label, macro
    compression_level: int | None

    def levels(self) -> list[PyramidLevel]:
        return [PyramidLevel(w, h, self.width / w) for w, h in self.kept]


def _plan(path, width, height, *, channels, tile, compression, quality, compression_level, downsample, mpp,
          aperio, app_mag, description, min_level_size, bigtiff, level_step, thumbnail, label,
          macro) -> _Plan:
    from ..naming import tiff_ascii

    description = tiff_ascii(description)  # TIFF text is 7-bit ASCII: a slide named Müller_01 must not crash
    _validate(width, height, channels, tile, compression, quality, downsample, mpp, app_mag, min_level_size)
    if compression_level is not None:
        if compression != "deflate":
            raise ConfigError(f"compression_level={compression_level!r} is for deflate (JPEG has `quality`, "
                              f"LZW no level), not {compression!r}")
        if (isinstance(compression_level, bool) or not isinstance(compression_level, (int, np.integer))
                or not 1 <= compression_level <= 9):
            raise ConfigError(f"compression_level={compression_level!r}: deflate levels are 1 (fastest) .. 9 "
                              f"(smallest); {DEFAULT_DEFLATE_LEVEL} is the default")
    thumb_size = _validate_aperio_pages(aperio, level_step, thumbnail, label, macro)
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        raise SlideError(f"cannot write {path}: directory {directory} does not exist; create it first")
    if not os.access(directory, os.W_OK):
        raise SlideError(f"cannot write {path}: directory {directory} is not writable; choose another output")
    if path.is_dir():
        raise SlideError(f"cannot write {path}: it is a directory; give a file name")
    halvings = _halvings(level_step)
    kept = pyramid_sizes(width, height, min_level_size, level_step)
    keep = [k * halvings for k in range(len(kept))]  # indices of the kept levels in the 2x cascade
    depth = keep[-1]
    collect = None  # the 2x level gathered whole for the thumbnail, label and macro
    if thumb_size is not None or callable(label) or callable(macro):
        collect = 0
        while max(_cascade_sizes(width, height, collect)[-1]) > (thumb_size or THUMBNAIL_SIZE):
            collect += 1
        depth = max(depth, collect)
    if bigtiff is None:
        bigtiff = width * height * channels * 4 // 3 > 2**31
    options = dict(compression=compression, quality=quality, downsample=downsample, mpp=mpp, aperio=aperio,
                   app_mag=app_mag, description=description, thumbnail=thumb_size is not None, label=label,
                   macro=macro)
    return _Plan(path, directory, int(width), int(height), channels, int(tile),
                 _cascade_sizes(width, height, depth), kept, keep, collect, bool(bigtiff), options,
                 None if compression_level is None else int(compression_level))


def _write_file(plan: _Plan, tiles: Level0Tiles, executor: Executor, stats: dict,
                aborted: Callable[[], bool] = lambda: False) -> None:
    """Write the planned file from `tiles` under a temporary name and move it into place."""
    token = secrets.token_hex(4)
    temp = plan.directory / f".{plan.path.name}.{token}.partial"
    spool_path = plan.directory / f".{plan.path.name}.{token}.spool"
    encode = _TileEncoder(plan.options["compression"], plan.channels, plan.options["quality"], plan.tile,
                          plan.compression_level)
    written = False
    try:
        with _open_output(temp) as fh:
            spool = _Spool(spool_path, len(plan.sizes))
            try:
                _write_levels(fh, plan, tiles, spool, encode, executor, stats)
            finally:
                spool.close()
                _remove_quietly(spool_path)
            fh.flush()
            os.fsync(fh.fileno())
        if aborted():
            raise _Aborted()
        os.replace(temp, plan.path)
        written = True
    except _SourceFailed as failed:
        raise failed.error from None
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise SlideError(f"disk full while writing {plan.path}: free space in {plan.directory} or write "
                             f"elsewhere (nothing was left under that name)") from exc
        raise SlideError(f"cannot write {plan.path}: {exc.strerror or exc}") from exc
    finally:
        if not written:
            _remove_quietly(temp)
            _remove_quietly(spool_path)


def _write_levels(fh, plan: _Plan, tiles: Level0Tiles, spool: _Spool, encode: _TileEncoder,
                  executor: Executor, stats: dict) -> None:
    o = plan.options
    channels, tile, sizes, keep = plan.channels, plan.tile, plan.sizes, plan.keep
    compression, quality, mpp, aperio = o["compression"], o["quality"], o["mpp"], o["aperio"]
    description, app_mag, thumbnail = o["description"], o["app_mag"], o["thumbnail"]
    width, height = sizes[0]
    n_rows, n_cols = math.ceil(height / tile), math.ceil(width / tile)
    threads = _pool_threads(executor)
    # tiles in flight: enough to keep every pool thread busy while the first one is written, and for a
    # source of whole bands, the next band's tiles while this one's are written
    lookahead = 2 * threads + 2 + (n_cols if isinstance(tiles, _BandTiles) else 0)
    lower = _LowerLevels(executor, encode, spool, 2 * threads + 2, stats)
    cascade = _Cascade(sizes, channels, tile, o["downsample"], lower.emit, keep, plan.collect)
    mode = o["downsample"] if len(sizes) > 1 else None
    pending: collections.deque = collections.deque()

    def level0_tiles() -> Iterator[bytes]:
        total = n_rows * n_cols
        submitted = 0
        for i in range(total):
            while submitted < total and len(pending) < lookahead:
                t_row, t_col, pixels = next(tiles)
                pending.append((t_row, t_col, pixels, executor.submit(_encode_level0, encode, pixels, mode)))
                submitted += 1
            t_row, t_col, pixels, future = pending.popleft()
            data, small, seconds = _result(future, stats)
            stats["encode_seconds"] += seconds
            stats["tiles"] += 1
            cascade.add_level0_tile(t_row, t_col, pixels, small)
            if t_col == n_cols - 1:
                cascade.end_level0_row(t_row)
            if i == total - 1:  # before the last yield: tifffile stops pulling after the last tile
                lower.drain()
                cascade.check_complete()
            yield data

    common = dict(dtype=np.uint8, tile=(tile, tile), compression=compression, metadata=None,
                  photometric="rgb" if channels == 3 else "minisblack", resolutionunit="CENTIMETER",
                  software="fastgicn")
    if compression == "jpeg" and channels == 3:
        common["subsampling"] = (2, 2)
    # Aperio writes its tiled reduced levels as NewSubfileType 0 (tifffile's SVS reader needs that); a
    # generic pyramid (or an SVS without a thumbnail, as before) marks them FILETYPE_REDUCEDIMAGE.
    reduced_subfiletype = 0 if thumbnail else 1
    stripped = dict(photometric=common["photometric"], metadata=None, software="fastgicn",
                    rowsperstrip=_STRIP_ROWS)
    writer = tifffile.TiffWriter(fh, bigtiff=plan.bigtiff)
    try:
        for level in keep:
            w, h = sizes[level]
            if aperio:
                desc = aperio_description(width, height, tile, compression, quality, mpp, app_mag,
                                          None if level == 0 else (w, h), description or "")
            else:
                desc = description if level == 0 else None
            kwargs = dict(common)
            if mpp is not None:
                kwargs["resolution"] = (1e4 / (mpp * width / w), 1e4 / (mpp * height / h))
            level_tiles = level0_tiles() if level == 0 else spool.tiles(level)
            shape = (h, w, channels) if channels > 1 else (h, w)
            writer.write(level_tiles, shape=shape, description=desc,
                         subfiletype=0 if level == 0 else reduced_subfiletype, **kwargs)
            if level == 0:
                cascade.check_complete()
                if thumbnail:  # the whole cascade is built once level 0 is: the thumbnail is ready
                    small = cascade.overview
                    desc = aperio_thumbnail_description(width, height, (small.shape[1], small.shape[0]), mpp,
                                                        app_mag, description or "")
                    writer.write(small, description=desc, subfiletype=0,
                                 **_stripped_codec(compression, quality, small), **stripped)
        for name, image, subfiletype, codec in (("label", o["label"], _SUBFILETYPE_LABEL, "lzw"),
                                                ("macro", o["macro"], _SUBFILETYPE_MACRO, "jpeg")):
            if image is None:
                continue
            image = _check_associated(name, image(cascade.overview) if callable(image) else image)
            writer.write(image, description=aperio_associated_description(name, image.shape[1::-1]),
                         subfiletype=subfiletype, **_stripped_codec(codec, quality, image),
                         **dict(stripped, photometric="rgb" if image.ndim == 3 else "minisblack"))
    except BaseException:
        _cancel([p[3] for p in pending] + [f for _, f in lower.pending])
        with contextlib.suppress(Exception):  # keep the original error; the file is discarded anyway
            writer.close()
        raise
    writer.close()


def _new_stats() -> dict:
    return {"tiles": 0, "encode_seconds": 0.0, "wait_seconds": 0.0}


class _CallbackTiles:
    """Level-0 tiles pulled from `read_tile(l0_x, l0_y, w, h)`, checked and copied (the pool encodes them
    later, so a callback may reuse its buffer)."""

    def __init__(self, read_tile: ReadTile, width: int, height: int, tile: int, channels: int):
        self._it = self._tiles(read_tile, width, height, tile, channels)

    @staticmethod
    def _tiles(read_tile, width, height, tile, channels):
        for t_row in range(math.ceil(height / tile)):
            for t_col in range(math.ceil(width / tile)):
                x, y = t_col * tile, t_row * tile
                w, h = min(tile, width - x), min(tile, height - y)
                try:
                    pixels = read_tile(x, y, w, h)
                except OSError as exc:  # a failure to read the source is not a failure to write the file
                    raise _SourceFailed(exc) from exc
                yield t_row, t_col, np.array(_check_tile(pixels, x, y, w, h, channels), copy=True)

    def __iter__(self):
        return self

    def __next__(self):
        return next(self._it)


class _BandTiles(_CallbackTiles):
    """Level-0 tiles cut from whole bands of `tile` rows, which `next_band(top)` hands over in order."""

    def __init__(self, next_band: Callable[[int], np.ndarray], width: int, height: int, tile: int):
        self._it = self._cut(next_band, width, height, tile)

    @staticmethod
    def _cut(next_band, width, height, tile):
        for t_row in range(math.ceil(height / tile)):
            band = next_band(t_row * tile)
            for t_col, x in enumerate(range(0, width, tile)):
                yield t_row, t_col, band[:, x:x + tile]


def write_pyramid(path, width: int, height: int, read_tile: ReadTile, *, channels: int = 3, tile: int = 256,
                  compression: str = "jpeg", quality: int = 90, downsample: str = "mean",
                  mpp: float | None = None, aperio: bool = False, app_mag: float | None = None,
                  description: str | None = None, min_level_size: int = 1024,
                  bigtiff: bool | None = None, level_step: int = 2, thumbnail: bool | int = False,
                  label: np.ndarray | LowResImage | None = None,
                  macro: np.ndarray | LowResImage | None = None, compression_level: int | None = None,
                  pool: Executor | int | None = None) -> list[PyramidLevel]:
    """Write a pyramidal tiled TIFF from `read_tile(l0_x, l0_y, w, h)`, called once per level-0 tile in
    row-major order (on the calling thread, a few tiles ahead of the file) with the tile's size clipped at
    the right and bottom edges.

    `read_tile` returns uint8 pixels, h x w x 3 (channels=3) or h x w (channels=1). `mpp` (microns per level-0
    pixel) is stored as resolution tags in pixels per centimetre on every level and, with `aperio=True`, as
    ``MPP = ...`` (with ``AppMag = ...``) in an Aperio ImageDescription; `description` is the ImageDescription
    of a generic TIFF, or extra ``key = value`` text for Aperio. `bigtiff=None` chooses BigTIFF when the file
    could pass 4 GB. `level_step` is the size ratio of consecutive levels (2, or 4 for Aperio's 1, 4, 16, ...;
    see the module notes). With `aperio=True`: `thumbnail=True` (or a long side in px) writes a stripped
    thumbnail page after level 0, compressed like the levels; `label` and `macro` (uint8 H x W x 3 or H x W,
    or a function of the thumbnail-sized low-resolution level, which it must not modify, returning such
    pixels) are written at the end as stripped LZW and JPEG pages. `compression_level` is the deflate level
    (1..9, default `DEFAULT_DEFLATE_LEVEL`); `pool` the threads that encode tiles (None: the shared pool of
    the usable cores; n: n threads of its own; or an Executor); the file is the same byte for byte whatever
    the pool. Returns the tiled levels written. Raises `ConfigError` for bad arguments and `SlideError` when
    the file cannot be written (the destination is then left as it was).
    """
    plan = _plan(path, width, height, channels=channels, tile=tile, compression=compression, quality=quality,
                 compression_level=compression_level, downsample=downsample, mpp=mpp, aperio=aperio,
                 app_mag=app_mag, description=description, min_level_size=min_level_size, bigtiff=bigtiff,
                 level_step=level_step, thumbnail=thumbnail, label=label, macro=macro)
    executor, release = _acquire_pool(pool)
    try:
        _write_file(plan, _CallbackTiles(read_tile, plan.width, plan.height, plan.tile, channels), executor,
                    _new_stats())
    finally:
        release()
    return plan.levels()


class _Aborted(Exception):
    """Raised on the writer thread to make it discard the temporary file."""


class PyramidWriter:
    """A pyramidal tiled TIFF pushed a band of rows at a time: the push form of `write_pyramid`.

    ``write_rows(y0, rows)`` takes the next rows (uint8 ``(n, width)``, or ``(n, width, 3)`` with
    ``channels=3``; `y0` must follow the previous call; the rows are copied, so the caller may reuse its
    buffer); ``close()`` waits until the file is complete and renamed into place and returns its path
    (`levels` then lists the levels written); ``abort()`` discards it and returns once no thread of this
    writer runs and no temporary file is left. Arguments as for `write_pyramid`, which checks them here.

    Threads: the calling thread only copies rows into a band of `tile` rows and hands each full band to this
    writer's thread (blocking while `queue_bands` bands wait); that thread cuts the band into tiles, gives
    them to the encoding `pool` (a few tiles and at most about a band ahead), builds the lower levels from
    the reduced tiles the pool returns and passes the encoded tiles, in order, to tifffile, which writes the
    IFDs; the lower levels' tiles are encoded on the pool too and spooled until level 0 is complete. Memory:
    about ``(queue_bands + 3) * tile * width * channels`` bytes, plus one band per lower level.

    `seconds` is the work spent on this file (encoding on the pool, plus this writer's thread when not
    waiting); `encode_seconds`, `tiles` (level-0 tiles encoded) and `wait_seconds` break it down.
    """

    def __init__(self, path, width: int, height: int, *, channels: int = 1, tile: int = 256,
                 compression: str = "deflate", quality: int = 90, compression_level: int | None = None,
                 downsample: str = "mean", mpp: float | None = None, aperio: bool = False,
                 app_mag: float | None = None, description: str | None = None, min_level_size: int = 1024,
                 bigtiff: bool | None = None, level_step: int = 2, thumbnail: bool | int = False,
                 label=None, macro=None, pool: Executor | int | None = None, queue_bands: int = 1):
        self._plan = plan = _plan(path, width, height, channels=channels, tile=tile, compression=compression,
                                  quality=quality, compression_level=compression_level, downsample=downsample,
                                  mpp=mpp, aperio=aperio, app_mag=app_mag, description=description,
                                  min_level_size=min_level_size, bigtiff=bigtiff, level_step=level_step,
                                  thumbnail=thumbnail, label=label, macro=macro)
        self.path, self.width, self.height, self.tile = plan.path, plan.width, plan.height, plan.tile
        self.channels = channels
        self.levels: list[PyramidLevel] | None = None
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, int(queue_bands)))
        self._abort = threading.Event()
        self._error: BaseException | None = None
        self._next_row = 0
        self._band: np.ndarray | None = None
        self._band_top = 0
        self._band_fill = 0
        self._closed = False
        self._stats = _new_stats()
        self._thread_seconds = 0.0
        self._executor, self._release = _acquire_pool(pool)
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"fastgicn-write-{self.path.name}")
        try:
            self._thread.start()
        except BaseException:
            self._release()
            raise

    @property
    def encode_seconds(self) -> float:
        return self._stats["encode_seconds"]

    @property
    def wait_seconds(self) -> float:
        return self._stats["wait_seconds"]

    @property
    def tiles(self) -> int:
        return self._stats["tiles"]

    @property
    def seconds(self) -> float:
        return self._thread_seconds + self._stats["encode_seconds"]

    # writer thread -----------------------------------------------------------------------------------
    def _next_band(self, top: int) -> np.ndarray:
        t0 = time.perf_counter()
        while True:
            if self._abort.is_set():
                raise _Aborted()
            try:
                got, band = self._queue.get(timeout=0.05)
                break
            except queue.Empty:
                continue
        self._stats["wait_seconds"] += time.perf_counter() - t0
        if got != top:
            raise RuntimeError(f"writer of {self.path} expected the band at row {top}, got {got}")
        return band

    def _run(self) -> None:
        t0 = time.perf_counter()
        try:
            tiles = _BandTiles(self._next_band, self.width, self.height, self.tile)
            _write_file(self._plan, tiles, self._executor, self._stats, self._abort.is_set)
            self.levels = self._plan.levels()
        except _Aborted:
            pass
        except BaseException as exc:  # handed to the main thread by write_rows / close
            self._error = exc
        finally:
            self._release()
            self._thread_seconds = time.perf_counter() - t0 - self._stats["wait_seconds"]

    # calling thread ----------------------------------------------------------------------------------
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
        row_shape = (self.width,) if self.channels == 1 else (self.width, self.channels)
        if rows.shape[1:] != row_shape or rows.dtype != np.uint8:
            raise ConfigError(f"{self.path}: rows must be uint8 (n, {', '.join(map(str, row_shape))}), got "
                              f"{rows.dtype} {rows.shape}")
        if y0 + len(rows) > self.height:
            raise ConfigError(f"{self.path}: rows {y0}..{y0 + len(rows)} pass the image height {self.height}")
        if self._error is not None:
            raise self._error
        self._next_row += len(rows)
        i = 0
        while i < len(rows):
            if self._band is None:
                n = min(self.tile, self.height - self._band_top)
                self._band = np.empty((n,) + row_shape, np.uint8)
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
            if self._error is not None:
                raise self._error
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
        """Stop the writer and delete its temporary files; the final name is never created (a no-op once
        closed)."""
        if self._closed:
            return
        self._abort.set()
        with contextlib.suppress(queue.Empty):
            while True:
                self._queue.get_nowait()
        self._thread.join()
        self._closed = True
