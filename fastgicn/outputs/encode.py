"""Tiles encoded on a pool of threads, as tifffile would encode them: the codecs (JPEG as YCbCr 2x2, deflate,
LZW), one encoding per value for uniform single-channel tiles, the process-wide pool shared by every writer
open at once, and the spool that parks the lower levels' encoded tiles until their IFD is written."""
from __future__ import annotations

import collections
import concurrent.futures
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, ThreadPoolExecutor
from pathlib import Path

import imagecodecs
import numpy as np

from ..cpus import usable_cpus
from ..errors import ConfigError
from .reduce import reduce_tile, uniform_value

COMPRESSIONS = ("jpeg", "deflate", "lzw")
# The deflate level when none is given (see DEFAULT_DEFLATE_LEVEL's note in the module docstring).
DEFAULT_DEFLATE_LEVEL = 6


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


class _Ready:
    """A job already done, in the place of a pool future: a uniform tile, encoded from the cache without a
    round trip through the pool."""

    __slots__ = ("_value",)

    def __init__(self, value) -> None:
        self._value = value

    def done(self) -> bool:
        return True

    def result(self):
        return self._value

    def cancel(self) -> bool:
        return True


def _encode_level0_job(executor: Executor, encode: _TileEncoder, pixels: np.ndarray, mode: str | None,
                       value: int | None = None):
    """The job of one level-0 tile: done at once for a uniform single-channel tile (its bytes are cached,
    its reduction is a fill), else `_encode_level0` on the pool. `value`: the tile is known to be uniform."""
    if value is None and encode.channels == 1:
        value = uniform_value(pixels)
    if value is None:
        return executor.submit(_encode_level0, encode, pixels, mode)
    return _Ready((encode(pixels, value), None if mode is None else reduce_tile(pixels, value, mode), 0.0))


def _encode_timed(encode: _TileEncoder, block: np.ndarray):
    t0 = time.perf_counter()
    return encode(block), time.perf_counter() - t0


class _LowerLevels:
    """Encodes the tiles of levels 1..n on the pool and spools them in the order they were emitted."""

    def __init__(self, executor: Executor, encode: _TileEncoder, spool: _Spool, limit: int, stats: dict):
        self.executor, self.encode, self.spool, self.limit, self.stats = executor, encode, spool, limit, stats
        self.pending: collections.deque = collections.deque()

    def emit(self, level: int, block: np.ndarray, value: int | None = None) -> None:
        """Queue `block` of `level` for encoding; a uniform one (`value`: its pixel) is encoded here, from the
        cache, before this returns (the caller may refill it)."""
        job = self.executor.submit(_encode_timed, self.encode, block) if value is None else \
            _Ready((self.encode(block, value), 0.0))
        self.pending.append((level, job))
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
