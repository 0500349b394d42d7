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

Memory: level-0 tiles are encoded as they arrive; lower levels are built in bands of `tile` rows (about
``tile * width * channels`` bytes over all levels) and their encoded tiles are spooled to a temporary file
beside the output, because TIFF wants each level's tiles after its IFD and level 1 is complete only once
level 0 is. The TIFF is written to a hidden temporary name in the same directory and moved into place with
`os.replace` only when complete, so an interrupted run never leaves a file under the final name; on any error
the temporary files are removed and, when the disk is full, a `SlideError` names the file.
"""
from __future__ import annotations

import contextlib
import errno
import math
import os
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import imagecodecs
import numpy as np
import tifffile

from ..errors import ConfigError, SlideError

COMPRESSIONS = ("jpeg", "deflate", "lzw")
LOSSLESS_COMPRESSIONS = ("deflate", "lzw")
DOWNSAMPLE_MODES = ("mean", "majority", "max")
# Rows are reduced in chunks this wide, so temporaries stay small however wide the slide is.
_REDUCE_CHUNK_COLUMNS = 8192

ReadTile = Callable[[int, int, int, int], np.ndarray]


@dataclass(frozen=True)
class PyramidLevel:
    """One level as written: its size in pixels and its downsample from level 0 (width ratio)."""

    width: int
    height: int
    downsample: float


def pyramid_sizes(width: int, height: int, min_level_size: int = 1024) -> list[tuple[int, int]]:
    """Sizes of the levels: level 0, then each half the one above (rounded up) until the long side fits."""
    sizes = [(width, height)]
    while max(sizes[-1]) > min_level_size:
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
    head = f"Aperio Image Library fastgicn\r\n{width}x{height} [0,0 {width}x{height}] ({tile}x{tile})"
    if level_size is not None:
        head += f" -> {level_size[0]}x{level_size[1]}"
    fields = [f"{head} {codec}"]
    if app_mag is not None:
        fields.append(f"AppMag = {app_mag:g}")
    if mpp is not None:
        fields.append(f"MPP = {mpp:.6g}")
    if extra:
        fields.append(extra)
    return "|".join(fields)


def _tile_encoder(compression: str, channels: int, quality: int) -> Callable[[np.ndarray], bytes]:
    """Encode one full tile exactly as tifffile would for the same compression and photometric tags."""
    if compression == "jpeg" and channels == 3:
        return lambda t: imagecodecs.jpeg8_encode(t, level=quality, colorspace="RGB", outcolorspace="YCBCR",
                                                  subsampling=(2, 2))
    if compression == "jpeg":
        return lambda t: imagecodecs.jpeg8_encode(t, level=quality)
    if compression == "deflate":
        return lambda t: imagecodecs.deflate_encode(t, level=6)
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

    def __init__(self, compression: str, channels: int, quality: int, tile: int):
        self.encode_full = _tile_encoder(compression, channels, quality)
        self.tile, self.channels = tile, channels
        self._uniform: dict[int, bytes] = {}

    def __call__(self, block: np.ndarray, value: int | None = None) -> bytes:
        if value is None and self.channels == 1:
            value = uniform_value(block)
        if value is not None:  # edge padding keeps a uniform tile uniform, so one encoding serves every size
            if value not in self._uniform:
                self._uniform[value] = self.encode_full(np.full((self.tile, self.tile), value, np.uint8))
            return self._uniform[value]
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
    """Builds levels 1..n from level-0 tiles: one band of `tile` rows per level, reduced 2x2 into the next."""

    def __init__(self, sizes, channels, tile, mode, encode, spool):
        self.sizes, self.tile, self.mode, self.encode, self.spool = sizes, tile, mode, encode, spool
        shape = (channels,) if channels > 1 else ()
        self.bands = [None] + [np.zeros((tile, w) + shape, np.uint8) for w, _ in sizes[1:]]
        self.band_row = [0] * len(sizes)  # index of the band (tile row) each level is filling
        self.filled = [0] * len(sizes)  # rows of that band filled so far

    def add_level0_tile(self, t_row: int, t_col: int, pixels: np.ndarray, value: int | None = None) -> None:
        if len(self.sizes) == 1:
            return
        half = self.tile // 2
        if value is not None:  # a uniform tile reduces to the same value in every mode
            reduced = value if self.mode != "majority" else (255 if value >= 128 else 0)
            small = np.full(((pixels.shape[0] + 1) // 2, (pixels.shape[1] + 1) // 2), reduced, np.uint8)
        else:
            small = downsample2(pixels, self.mode)
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
        for x in range(0, width, self.tile):
            self.spool.add(level, self.encode(band[:, x:x + self.tile]))
        if level + 1 < len(self.sizes):
            below = self.bands[level + 1]
            y = (self.band_row[level] % 2) * (self.tile // 2)
            for x in range(0, width, _REDUCE_CHUNK_COLUMNS):
                small = downsample2(band[:, x:x + _REDUCE_CHUNK_COLUMNS], self.mode)
                below[y:y + small.shape[0], x // 2:x // 2 + small.shape[1]] = small
            self.band_row[level] += 1
            self.filled[level] = 0
            self._add_rows(level + 1, (band_rows + 1) // 2)
        else:
            self.band_row[level] += 1
            self.filled[level] = 0

    def check_complete(self) -> None:
        for level, (w, h) in enumerate(self.sizes[1:], start=1):
            expected = math.ceil(w / self.tile) * math.ceil(h / self.tile)
            if len(self.spool.index[level]) != expected:
                raise RuntimeError(f"pyramid level {level}: {len(self.spool.index[level])} tiles built, "
                                   f"expected {expected}")


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


def _open_output(path: Path):
    """The temporary output file (a seam the tests use to simulate a full disk)."""
    return open(path, "wb")


def _remove_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def write_pyramid(path, width: int, height: int, read_tile: ReadTile, *, channels: int = 3, tile: int = 256,
                  compression: str = "jpeg", quality: int = 90, downsample: str = "mean",
                  mpp: float | None = None, aperio: bool = False, app_mag: float | None = None,
                  description: str | None = None, min_level_size: int = 1024,
                  bigtiff: bool | None = None) -> list[PyramidLevel]:
    """Write a pyramidal tiled TIFF from `read_tile(l0_x, l0_y, w, h)`, called once per level-0 tile in
    row-major order with the tile's size clipped at the right and bottom edges.

    `read_tile` returns uint8 pixels, h x w x 3 (channels=3) or h x w (channels=1). `mpp` (microns per level-0
    pixel) is stored as resolution tags in pixels per centimetre on every level and, with `aperio=True`, as
    ``MPP = ...`` (with ``AppMag = ...``) in an Aperio ImageDescription; `description` is the ImageDescription
    of a generic TIFF, or extra ``key = value`` text for Aperio. `bigtiff=None` chooses BigTIFF when the file
    could pass 4 GB. Returns the levels written. Raises `ConfigError` for bad arguments and `SlideError` when
    the file cannot be written (the destination is then left as it was).
    """
    _validate(width, height, channels, tile, compression, quality, downsample, mpp, app_mag, min_level_size)
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        raise SlideError(f"cannot write {path}: directory {directory} does not exist; create it first")
    if not os.access(directory, os.W_OK):
        raise SlideError(f"cannot write {path}: directory {directory} is not writable; choose another output")
    if path.is_dir():
        raise SlideError(f"cannot write {path}: it is a directory; give a file name")
    sizes = pyramid_sizes(width, height, min_level_size)
    if bigtiff is None:
        bigtiff = width * height * channels * 4 // 3 > 2**31
    token = secrets.token_hex(4)
    temp = directory / f".{path.name}.{token}.partial"
    spool_path = directory / f".{path.name}.{token}.spool"
    encode = _TileEncoder(compression, channels, quality, tile)
    written = False
    try:
        with _open_output(temp) as fh:
            spool = _Spool(spool_path, len(sizes))
            try:
                _write_levels(fh, sizes, read_tile, spool, encode, channels=channels, tile=tile,
                              compression=compression, quality=quality, downsample=downsample, mpp=mpp,
                              aperio=aperio, app_mag=app_mag, description=description, bigtiff=bigtiff)
            finally:
                spool.close()
                _remove_quietly(spool_path)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(temp, path)
        written = True
    except _SourceFailed as failed:
        raise failed.error from None
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise SlideError(f"disk full while writing {path}: free space in {directory} or write elsewhere "
                             f"(nothing was left under that name)") from exc
        raise SlideError(f"cannot write {path}: {exc.strerror or exc}") from exc
    finally:
        if not written:
            _remove_quietly(temp)
            _remove_quietly(spool_path)
    return [PyramidLevel(w, h, width / w) for w, h in sizes]


def _write_levels(fh, sizes, read_tile, spool, encode, *, channels, tile, compression, quality, downsample,
                  mpp, aperio, app_mag, description, bigtiff) -> None:
    cascade = _Cascade(sizes, channels, tile, downsample, encode, spool)
    width, height = sizes[0]

    def level0_tiles() -> Iterator[bytes]:
        n_rows, n_cols = math.ceil(height / tile), math.ceil(width / tile)
        for t_row in range(n_rows):
            for t_col in range(n_cols):
                x, y = t_col * tile, t_row * tile
                w, h = min(tile, width - x), min(tile, height - y)
                try:
                    pixels = read_tile(x, y, w, h)
                except OSError as exc:  # a failure to read the source is not a failure to write the file
                    raise _SourceFailed(exc) from exc
                pixels = _check_tile(pixels, x, y, w, h, channels)
                value = uniform_value(pixels)
                cascade.add_level0_tile(t_row, t_col, pixels, value)
                if t_col == n_cols - 1:  # before the last yield: tifffile stops pulling after the last tile
                    cascade.end_level0_row(t_row)
                yield encode(pixels, value)

    common = dict(dtype=np.uint8, tile=(tile, tile), compression=compression, metadata=None,
                  photometric="rgb" if channels == 3 else "minisblack", resolutionunit="CENTIMETER",
                  software="fastgicn")
    if compression == "jpeg" and channels == 3:
        common["subsampling"] = (2, 2)
    writer = tifffile.TiffWriter(fh, bigtiff=bigtiff)
    try:
        for level, (w, h) in enumerate(sizes):
            if aperio:
                desc = aperio_description(width, height, tile, compression, quality, mpp, app_mag,
                                          None if level == 0 else (w, h), description or "")
            else:
                desc = description if level == 0 else None
            kwargs = dict(common)
            if mpp is not None:
                kwargs["resolution"] = (1e4 / (mpp * width / w), 1e4 / (mpp * height / h))
            tiles = level0_tiles() if level == 0 else spool.tiles(level)
            shape = (h, w, channels) if channels > 1 else (h, w)
            writer.write(tiles, shape=shape, description=desc, subfiletype=0 if level == 0 else 1, **kwargs)
            if level == 0:
                cascade.check_complete()
    except BaseException:
        with contextlib.suppress(Exception):  # keep the original error; the file is discarded anyway
            writer.close()
        raise
    writer.close()
