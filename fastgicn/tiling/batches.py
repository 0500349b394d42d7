"""Reader threads filling a ring of batch buffers, with back-pressure.

`BatchRing(slide, tiles, level=..., tile_size=..., batch_size=...)` starts `threads` reader threads. Each
claims the next batch number, waits until that batch's slot of the ring is free, then claims a run of
consecutive candidate tiles from a shared cursor and reads each straight into the slot (`Slide.read_into`: OpenSlide's read
releases the GIL, the Cython tiler converts ARGB to RGB on white and counts background pixels in the same
pass). A tile whose tissue fraction is too low (`grid.keep_tile`, the paper's rule when
`min_tissue_fraction == 0`) is rejected and its place in the slot is reused, so batches are full except the
last. The consumer iterates the ring and gets batches in batch-number order.

Memory is the ring: ``ring * batch_size * tile_size^2 * 3`` bytes, allocated once; a reader that runs ahead
blocks until the consumer releases a slot. With CUDA the ring is pinned (page-locked) so host-to-device copies
can be asynchronous. A batch's memory stays valid until `release(batch)` or the next iteration step.

Errors and shutdown: an exception in a reader thread stops every reader and is raised in the consumer (the
original exception, e.g. a `SlideError` naming the file). Leaving the `with` block, `close()`, an exception
or KeyboardInterrupt in the consumer stop and join every thread; no thread is left behind and the ring holds
no file handle (the slide stays open for its owner to close).
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from ..config import PAPER_WHITE_THRESHOLD
from ..errors import ConfigError
from .grid import keep_tile, real_pixels
from ..slide.resolution import Resolution

_FREE, _FILLING, _READY, _IN_USE = range(4)


@dataclass
class Batch:
    """One filled slot: `pixels` (n, t, t, 3) uint8 and `tensor` (the same memory as a torch tensor, pinned
    with CUDA) hold tiles `indices` (positions in the ring's tile array); `rejected` were read and dropped."""

    seq: int
    slot: int
    indices: np.ndarray
    rejected: np.ndarray
    background: np.ndarray
    pixels: np.ndarray
    tensor: torch.Tensor

    def __len__(self) -> int:
        return len(self.indices)


@dataclass
class RingStats:
    tiles_read: int = 0
    tiles_rejected: int = 0
    read_seconds: float = 0.0  # summed over reader threads: time inside read_into
    # the CPU those reads took (thread time): on cores shared with the runner, stitcher and writers the wall
    # time above also counts the time a reader waited to be scheduled
    read_cpu_seconds: float = 0.0
    wait_seconds: float = 0.0  # consumer time spent waiting for a batch (the readers are the bottleneck)
    stall_seconds: float = 0.0  # summed over readers: time waiting for a free slot (the consumer is)
    batches: int = 0
    threads: int = 0
    ring: int = 0
    ring_bytes: int = 0
    pinned: bool = False
    per_thread: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d.pop("per_thread")
        return d


class _Stop(Exception):
    pass


class BatchRing:
    """Iterate over batches of tissue tiles read by `threads` reader threads into a bounded ring.

    `tiles`: (N, 4) int64 ``l0_x, l0_y, w, h`` (from `tissue_tiles`); tiles are read at `level` (an index or a
    `Resolution`) as
    `tile_size` x `tile_size` pixels (white beyond the slide). `ring` slots (default threads + 2) of
    `batch_size` tiles bound the memory. `pin=None` pins the ring when CUDA is available.
    """

    def __init__(self, slide, tiles, *, level: int = 0, tile_size: int, batch_size: int, threads: int = 2,
                 ring: int | None = None, min_tissue_fraction: float = 0.0,
                 white_threshold: int = PAPER_WHITE_THRESHOLD, pin: bool | None = None):
        tiles = np.asarray(tiles)
        if tiles.ndim != 2 or tiles.shape[1] < 2 or not np.issubdtype(tiles.dtype, np.integer):
            raise ConfigError(f"tiles must be an (N, 4) integer array of l0_x, l0_y, w, h, got {tiles.dtype} "
                              f"{tiles.shape}")
        for name, v in (("tile_size", tile_size), ("batch_size", batch_size), ("threads", threads)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ConfigError(f"{name}={v!r}: use a positive integer")
        ring = threads + 2 if ring is None else ring
        if not isinstance(ring, (int, np.integer)) or ring < 1:
            raise ConfigError(f"ring={ring!r}: use a positive number of batch slots")
        self.slide, self.tiles = slide, tiles
        self.level = level if isinstance(level, Resolution) else int(level)  # read_into takes either
        self.tile_size, self.batch_size, self.n_threads, self.n_slots = int(tile_size), int(batch_size), \
            int(threads), int(ring)
        self.min_tissue_fraction, self.white_threshold = float(min_tissue_fraction), int(white_threshold)
        # pixels of each tile on the slide: an edge tile's tissue fraction is counted over these, not its padding
        # (a source without pyramid geometry, such as a test double, counts whole tiles)
        res = self.level if isinstance(self.level, Resolution) else None
        if res is None and hasattr(slide, "level_dimensions"):
            res = Resolution(self.level, 1.0, float(slide.level_downsamples[self.level]),
                             tuple(slide.level_dimensions[self.level]))
        self._real = (real_pixels(tiles, res.dimensions, res.downsample, self.tile_size) if res is not None
                      else np.full(len(tiles), self.tile_size ** 2, np.int64))
        self.pinned = bool(torch.cuda.is_available()) if pin is None else bool(pin)
        shape = (self.n_slots, self.batch_size, self.tile_size, self.tile_size, 3)
        if self.pinned:
            self._tensor = torch.empty(shape, dtype=torch.uint8, pin_memory=True)
            self._array = self._tensor.numpy()
        else:
            self._array = np.empty(shape, np.uint8)
            self._tensor = torch.from_numpy(self._array)
        self._indices = np.zeros((self.n_slots, self.batch_size), np.int64)
        self._background = np.zeros((self.n_slots, self.batch_size), np.int64)
        self._state = [_FREE] * self.n_slots
        # the batch number a slot holds or is being filled with; batch s may take slot s % ring only once
        # batch s - ring has left it (two readers waiting for one slot must not swap their turns)
        self._slot_seq = [slot - self.n_slots for slot in range(self.n_slots)]
        self._meta: dict[int, tuple[int, list[int]]] = {}  # seq -> (n kept, rejected indices)
        self._cond = threading.Condition()
        self._next_claim = 0  # next batch number a reader takes
        self._cursor = 0  # next candidate tile
        self._next_yield = 0  # next batch number the consumer takes
        self._accounted = 0  # tiles delivered to the consumer, kept or rejected
        self._held: Batch | None = None
        self._error: BaseException | None = None
        self._stopping = False
        self._threads: list[threading.Thread] = []
        self.stats = RingStats(threads=self.n_threads, ring=self.n_slots, ring_bytes=self._array.nbytes,
                               pinned=self.pinned)
        self._started = False

    # -- life cycle ----------------------------------------------------------------------------------
    def start(self) -> BatchRing:
        if self._started:
            return self
        self._started = True
        for k in range(self.n_threads if len(self.tiles) else 0):
            t = threading.Thread(target=self._reader, args=(k,), name=f"fastgicn-reader-{k}", daemon=True)
            self._threads.append(t)
            t.start()
        return self

    def __enter__(self) -> BatchRing:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop the readers and wait for them (each finishes at most the tile it is reading)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        for t in self._threads:
            while t.is_alive():
                t.join(timeout=0.1)
        self._threads = []

    @property
    def alive_threads(self) -> int:
        return sum(t.is_alive() for t in self._threads)

    # -- reader threads ------------------------------------------------------------------------------
    def _reader(self, k: int) -> None:
        t_read = t_stall = t_cpu = 0.0
        read = rejected_count = 0
        try:
            n_tiles, thr, t = len(self.tiles), self.white_threshold, self.tile_size
            n_pixels = t * t
            while True:
                with self._cond:
                    if self._stopping or self._cursor >= n_tiles:
                        return
                    seq = self._next_claim
                    self._next_claim += 1
                    slot = seq % self.n_slots
                    t0 = time.perf_counter()
                    while not self._stopping and not (self._state[slot] == _FREE
                                                      and self._slot_seq[slot] == seq - self.n_slots):
                        self._cond.wait()
                    t_stall += time.perf_counter() - t0
                    if self._stopping:
                        return
                    self._state[slot] = _FILLING
                    self._slot_seq[slot] = seq
                n = 0
                rejected: list[int] = []
                buf = self._array[slot]
                while n < self.batch_size:
                    # claim a run of consecutive tiles (batches stay in grid order, which keeps the
                    # stitcher's band small); a run shortened by rejected tiles is topped up with another
                    with self._cond:
                        if self._stopping:
                            return
                        i0 = self._cursor
                        if i0 >= n_tiles:
                            break
                        i1 = min(n_tiles, i0 + self.batch_size - n)
                        self._cursor = i1
                    for i in range(i0, i1):
                        if self._stopping:
                            return
                        x, y = int(self.tiles[i, 0]), int(self.tiles[i, 1])
                        t0, c0 = time.perf_counter(), time.thread_time()
                        background = self.slide.read_into(buf[n], x, y, self.level, thr)
                        t_read += time.perf_counter() - t0
                        t_cpu += time.thread_time() - c0
                        read += 1
                        real = int(self._real[i])
                        if keep_tile(background - (n_pixels - real), real, self.min_tissue_fraction):
                            self._indices[slot, n] = i
                            self._background[slot, n] = background
                            n += 1
                        else:
                            rejected.append(i)
                            rejected_count += 1
                with self._cond:
                    self._meta[seq] = (n, rejected)
                    self._state[slot] = _READY
                    self._cond.notify_all()
        except BaseException as exc:  # handed to the consumer
            with self._cond:
                if self._error is None:
                    self._error = exc
                self._stopping = True
                self._cond.notify_all()
        finally:
            with self._cond:
                self.stats.read_seconds += t_read
                self.stats.read_cpu_seconds += t_cpu
                self.stats.stall_seconds += t_stall
                self.stats.tiles_read += read
                self.stats.tiles_rejected += rejected_count
                self.stats.per_thread[k] = {"tiles": read, "read_seconds": t_read, "stall_seconds": t_stall}

    # -- consumer ------------------------------------------------------------------------------------
    def release(self, batch: Batch | None) -> None:
        """Give `batch`'s slot back to the readers (idempotent)."""
        if batch is None:
            return
        with self._cond:
            if self._state[batch.slot] == _IN_USE and self._slot_seq[batch.slot] == batch.seq:
                self._state[batch.slot] = _FREE
                self._cond.notify_all()
        if self._held is batch:
            self._held = None

    def __iter__(self):
        self.start()
        return self

    def __next__(self) -> Batch:
        self.release(self._held)
        while True:
            if self._accounted >= len(self.tiles):
                raise StopIteration
            seq = self._next_yield
            slot = seq % self.n_slots
            t0 = time.perf_counter()
            with self._cond:
                while not (self._state[slot] == _READY and self._slot_seq[slot] == seq):
                    if self._error is not None:
                        raise self._error
                    if self._stopping:
                        raise ConfigError("the batch ring was closed while batches were still expected")
                    self._cond.wait(timeout=0.5)
                n, rejected = self._meta.pop(seq)
                self._state[slot] = _IN_USE if n or rejected else _FREE
                self._cond.notify_all()
            self.stats.wait_seconds += time.perf_counter() - t0
            self._next_yield += 1
            if not n and not rejected:  # a reader found the tiles all taken: nothing to hand over
                continue
            self._accounted += n + len(rejected)
            self.stats.batches += 1
            batch = Batch(seq, slot, self._indices[slot, :n].copy(), np.asarray(rejected, np.int64),
                          self._background[slot, :n].copy(), self._array[slot, :n], self._tensor[slot, :n])
            self._held = batch
            return batch


def iterate_batches(slide, tiles, **kwargs):
    """Generator over `BatchRing` batches that always stops its threads (even if the caller breaks out)."""
    ring = BatchRing(slide, tiles, **kwargs)
    with ring:
        yield from ring
