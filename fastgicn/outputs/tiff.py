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
`compression_level` says otherwise (the segmentation maps use 1, see `PyramidBandWriter` below).

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
import contextlib
import errno
import math
import os
import queue
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile

from ..errors import ConfigError, SlideError
from .aperio import (
    _STRIP_ROWS,
    _SUBFILETYPE_LABEL,
    _SUBFILETYPE_MACRO,
    THUMBNAIL_SIZE,
    _check_associated,
    _stripped_codec,
    _validate_aperio_pages,
    aperio_associated_description,
    aperio_description,
    aperio_thumbnail_description,
)
from .encode import (
    COMPRESSIONS,
    DEFAULT_DEFLATE_LEVEL,
    _acquire_pool,
    _cancel,
    _encode_level0_job,
    _LowerLevels,
    _pool_threads,
    _result,
    _Spool,
    _TileEncoder,
)
from .reduce import (
    DOWNSAMPLE_MODES,
    _Cascade,
    _cascade_sizes,
    _halvings,
    pyramid_sizes,
)

LOSSLESS_COMPRESSIONS = ("deflate", "lzw")

ReadTile = Callable[[int, int, int, int], np.ndarray]
LowResImage = Callable[[np.ndarray], np.ndarray]  # the thumbnail-sized level -> a label or macro image


@dataclass(frozen=True)
class PyramidLevel:
    """One level as written: its size in pixels and its downsample from level 0 (width ratio)."""

    width: int
    height: int
    downsample: float


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
                t_row, t_col, pixels, value = next(tiles)
                job = _encode_level0_job(executor, encode, pixels, mode, value)
                pending.append((t_row, t_col, pixels, job))
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
                yield t_row, t_col, np.array(_check_tile(pixels, x, y, w, h, channels), copy=True), None

    def __iter__(self):
        return self

    def __next__(self):
        return next(self._it)


class _BandTiles(_CallbackTiles):
    """Level-0 tiles cut from whole bands of `tile` rows, which `next_band(top)` hands over in order, each
    with the value of all its pixels when the band is known to be uniform (else None)."""

    def __init__(self, next_band: Callable[[int], tuple[np.ndarray, int | None]], width: int, height: int,
                 tile: int):
        self._it = self._cut(next_band, width, height, tile)

    @staticmethod
    def _cut(next_band, width, height, tile):
        for t_row in range(math.ceil(height / tile)):
            band, value = next_band(t_row * tile)
            for t_col, x in enumerate(range(0, width, tile)):
                yield t_row, t_col, band[:, x:x + tile], value


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
        self._band_value: int | None = None
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
    def _next_band(self, top: int) -> tuple[np.ndarray, int | None]:
        t0 = time.perf_counter()
        while True:
            if self._abort.is_set():
                raise _Aborted()
            try:
                got, band, value = self._queue.get(timeout=0.05)
                break
            except queue.Empty:
                continue
        self._stats["wait_seconds"] += time.perf_counter() - t0
        if got != top:
            raise RuntimeError(f"writer of {self.path} expected the band at row {top}, got {got}")
        return band, value

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

    def write_rows(self, y0: int, rows: np.ndarray, copy: bool = True, value: int | None = None) -> None:
        """Append `rows` (see the class docstring). `copy=False`: whole bands of `rows` that start on a band
        boundary are handed to the writer as views, not copied; the caller promises never to modify `rows`
        afterwards (the pipeline's stitched rows are fresh arrays). `value`: every pixel of `rows` is this
        value (the caller has just looked, as the pipeline does for glass and tumour-free rows): the writer
        then skips its own look at each tile."""
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
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value <= 255:
                raise ConfigError(f"{self.path}: value={value!r}: give the rows' one pixel value (0..255) "
                                  "or None")
            value = int(value) if self.channels == 1 else None  # the hint serves single-channel tiles only
        self._next_row += len(rows)
        i = 0
        while i < len(rows):
            if self._band is None:
                n = min(self.tile, self.height - self._band_top)
                if not copy and len(rows) - i >= n:  # a whole band: its view, no copy
                    self._put((self._band_top, rows[i:i + n], value))
                    self._band_top += n
                    i += n
                    continue
                self._band = np.empty((n,) + row_shape, np.uint8)
                self._band_fill = 0
                self._band_value = value
            elif self._band_value != value:
                self._band_value = None
            take = min(len(rows) - i, len(self._band) - self._band_fill)
            self._band[self._band_fill:self._band_fill + take] = rows[i:i + take]
            self._band_fill += take
            i += take
            if self._band_fill == len(self._band):
                self._put((self._band_top, self._band, self._band_value))
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


# ---------------------------------------------------------------------------------------------------
# the segmentation maps: single-channel rows pushed as the stitcher finishes them

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
