"""Batch ring: every tile once, the paper's background rule, back-pressure, errors and clean shutdown."""
import threading
import time

import numpy as np
import pytest

from fastgicn.errors import SlideError
from fastgicn.slide import open_slide
from fastgicn.tiling.batches import BatchRing, iterate_batches
from fastgicn.tiling.grid import tile_grid


def reader_threads():
    return [t for t in threading.enumerate() if t.name.startswith("fastgicn-reader")]


def glass_and_tissue(h=300, w=420, seed=0):
    """Glass (all channels > 220) with a few tissue patches and one tile that has a single dark pixel."""
    rng = np.random.default_rng(seed)
    img = rng.integers(225, 256, (h, w, 3), dtype=np.uint8)
    img[40:150, 60:200] = rng.integers(120, 200, (110, 140, 3), dtype=np.uint8)
    img[200:260, 300:410] = rng.integers(100, 180, (60, 110, 3), dtype=np.uint8)
    img[5, 395] = (10, 10, 10)
    return img


class Instrumented:
    """A slide wrapper that counts reads, can be slowed down and can fail on the k-th read."""

    def __init__(self, slide, fail_at=None, delay=0.0):
        self.slide, self.fail_at, self.delay = slide, fail_at, delay
        self.reads = 0
        self.lock = threading.Lock()

    def read_into(self, out, l0_x, l0_y, level, thr):
        with self.lock:
            self.reads += 1
            k = self.reads
        if self.delay:
            time.sleep(self.delay)
        if self.fail_at is not None and k >= self.fail_at:
            raise SlideError(f"broken.svs: reading tile at ({l0_x}, {l0_y}) failed (test)")
        return self.slide.read_into(out, l0_x, l0_y, level, thr)


def reference_tile(img, x, y, t):
    padded = np.full((img.shape[0] + t, img.shape[1] + t, 3), 255, np.uint8)
    padded[:img.shape[0], :img.shape[1]] = img
    return padded[y:y + t, x:x + t]


@pytest.mark.parametrize("threads,batch_size,ring", [(1, 3, 1), (2, 4, None), (3, 1, 2)])
@pytest.mark.parametrize("min_fraction", [0.0, 0.05])
def test_every_tile_once_with_its_pixels_and_the_background_rule(threads, batch_size, ring, min_fraction):
    img = glass_and_tissue()
    t, stride = 64, 48
    slide = open_slide(img)
    grid = tile_grid(img.shape[1], img.shape[0], t, stride)
    kept, rejected = [], []
    with BatchRing(slide, grid, tile_size=t, batch_size=batch_size, threads=threads, ring=ring,
                   min_tissue_fraction=min_fraction) as batches:
        for b in batches:
            assert 0 < len(b) <= batch_size or len(b.rejected)
            assert b.tensor.data_ptr() == b.pixels.ctypes.data or len(b) == 0  # one memory, no copy
            for j, i in enumerate(b.indices):
                np.testing.assert_array_equal(b.pixels[j], reference_tile(img, *grid[i, :2], t))
            kept += b.indices.tolist()
            rejected += b.rejected.tolist()
    assert sorted(kept + rejected) == list(range(len(grid)))
    # independent reference of the rule: background = all three channels > 220, padding counts as glass
    tissue = np.array([(~(reference_tile(img, x, y, t) > 220).all(axis=2)).mean() for x, y, _, _ in grid])
    expected = tissue > 0 if min_fraction == 0 else tissue >= min_fraction
    assert sorted(kept) == np.flatnonzero(expected).tolist()
    assert 0 < len(rejected) < len(grid)
    assert batches.stats.tiles_read == len(grid) and batches.stats.tiles_rejected == len(rejected)
    if threads == 1:
        assert kept == sorted(kept)  # one reader keeps grid order
    assert not reader_threads()


def test_back_pressure_bounds_reads_ahead_by_the_ring():
    img = np.full((640, 640, 3), 100, np.uint8)
    slide = Instrumented(open_slide(img))
    grid = tile_grid(640, 640, 32, 32)  # 400 tiles
    ring = BatchRing(slide, grid, tile_size=32, batch_size=4, threads=3, ring=3)
    with ring:
        it = iter(ring)
        first = next(it)
        time.sleep(0.3)  # a slow consumer: readers must stop when the ring is full
        assert slide.reads == 3 * 4  # the batch held plus two filled ahead, nothing more
        assert len(first) == 4 and list(np.diff(first.indices)) == [1, 1, 1]  # a run of the grid
        time.sleep(0.1)
        assert slide.reads == 12
        next(it)  # releases the first slot: exactly one more batch is read
        time.sleep(0.3)
        assert slide.reads == 16
        assert ring.stats.ring_bytes == 3 * 4 * 32 * 32 * 3
    assert not reader_threads()


def test_reader_error_reaches_the_consumer_and_stops_every_thread():
    img = np.full((512, 512, 3), 120, np.uint8)
    slide = Instrumented(open_slide(img), fail_at=30, delay=0.001)
    grid = tile_grid(512, 512, 32, 32)
    got = 0
    with pytest.raises(SlideError, match="broken.svs"):
        with BatchRing(slide, grid, tile_size=32, batch_size=4, threads=3) as ring:
            for b in ring:
                got += len(b)
    assert got < len(grid)
    assert not reader_threads()


def test_keyboard_interrupt_and_early_exit_leave_no_thread():
    img = np.full((512, 512, 3), 120, np.uint8)
    grid = tile_grid(512, 512, 32, 32)
    with pytest.raises(KeyboardInterrupt):
        with BatchRing(Instrumented(open_slide(img), delay=0.002), grid, tile_size=32, batch_size=2,
                       threads=2) as ring:
            for i, _ in enumerate(ring):
                if i == 3:
                    raise KeyboardInterrupt
    assert not reader_threads()
    gen = iterate_batches(open_slide(img), grid, tile_size=32, batch_size=2, threads=2)
    next(gen)
    gen.close()  # the caller stops early: the generator's `with` joins the readers
    assert not reader_threads()


def test_empty_grid_and_pinning_off_without_cuda():
    slide = open_slide(np.full((64, 64, 3), 255, np.uint8))
    ring = BatchRing(slide, np.zeros((0, 4), np.int64), tile_size=32, batch_size=2)
    with ring:
        assert list(ring) == []
    import torch
    assert ring.pinned == torch.cuda.is_available()


def test_opens_slide_files_with_shared_or_per_thread_handles(tmp_path):
    from fastgicn.outputs.tiff import write_pyramid

    img = glass_and_tissue(300, 420, seed=4)[:256, :320].copy()
    path = tmp_path / "s.tif"
    write_pyramid(path, 320, 256, lambda x, y, w, h: img[y:y + h, x:x + w], channels=3, tile=64,
                  compression="deflate", mpp=0.25)
    grid = tile_grid(320, 256, 64, 64)
    for handles in ("shared", "per_thread"):
        slide = open_slide(path, handles=handles)
        try:
            seen = {}
            with BatchRing(slide, grid, tile_size=64, batch_size=3, threads=3) as ring:
                for b in ring:
                    for j, i in enumerate(b.indices):
                        seen[int(i)] = b.pixels[j].copy()
            for i, px in seen.items():
                np.testing.assert_array_equal(px, reference_tile(img, *grid[i, :2], 64))
        finally:
            slide.close()
    assert not reader_threads()
