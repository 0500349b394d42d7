"""The direct tiled-TIFF reader against OpenSlide and the stored pixels, over many on-disk layouts
(tests/tiff_layouts.py): JPEG RGB / YCbCr with and without shared JPEGTables, Aperio JPEG 2000 33003 / 33005,
deflate, LZW, zstd, none; tiles 240 / 256 / 512; odd sizes; 1/4/16 and 1/2/4 pyramids; SVS and generic TIFF.

References: level 0 is OpenSlide's own `read_region` composited on white; level k > 0 is the stored pixels of
level k (`stored_level`) at (round(l0_x / ds), round(l0_y / ds)), white outside. The first tests check those
references themselves (they run without the direct reader); the rest need `fastgicn.slide.direct`.
"""
from __future__ import annotations

import re
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import openslide
import pytest
import tifffile

from fastgicn.errors import SlideError
from fastgicn.slide import open_slide
from slide_fixtures import padded
from tiff_layouts import (DIRECT_LAYOUTS, FALLBACK_LAYOUTS, LAYOUTS, openslide_reads_zstd, openslide_region,
                          stored_level, write_j2k_triples, write_layout)



@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("layouts")
    out = {"dir": d, "zstd": openslide_reads_zstd(d)}
    for name, lay in LAYOUTS.items():
        out[name] = write_layout(d / f"{name}.{'svs' if lay.svs else 'tif'}", lay)
    return out


@pytest.fixture(scope="module")
def refs(files):
    """Per layout: an open OpenSlide handle and the stored levels (decoded once)."""
    cache = {}

    def get(name):
        if name not in cache:
            w = files[name]
            osr = openslide.OpenSlide(str(w.path))
            cache[name] = (osr, [stored_level(w.path, k) for k in range(osr.level_count)])
        return cache[name]

    yield get
    for osr, _ in cache.values():
        osr.close()


def _layout(files, name):
    if LAYOUTS[name].codec == "zstd" and not files["zstd"]:
        pytest.skip("this libopenslide's libtiff does not decode zstd tiles, so there is no OpenSlide reference")
    return files[name]



def level_regions(lw, lh, t):
    """(what, lvl_x, lvl_y, w, h) in the coordinates of a level of lw x lh stored in t x t tiles."""
    return [("tile corner", 0, 0, t, t), ("second tile corner", t, t, t, t), ("unaligned", 37, 11, 300, 190),
            ("spans tiles", t - 5, t - 7, 2 * t + 10, t + 20), ("straddles right/bottom", lw - 50, lh - 30, 100, 80),
            ("negative origin", -40, -3, 100, 80), ("wholly right", lw + 10, 5, 16, 16),
            ("wholly above-left", -30, -30, 20, 20), ("last pixel", lw - 1, lh - 1, 1, 1),
            ("last column", lw - 1, 0, 1, lh), ("whole level", 0, 0, lw, lh),
            ("beyond every edge", -7, -9, lw + 20, lh + 30)]


def reference(osr, stored, l0_x, l0_y, level, w, h):
    if level == 0:
        return openslide_region(osr, l0_x, l0_y, 0, w, h)
    ds = osr.level_downsamples[level]
    return padded(stored[level], round(l0_x / ds), round(l0_y / ds), w, h)


def cases(osr, tile):
    """(level, what, l0_x, l0_y, w, h) for every level."""
    out = []
    for level, (lw, lh) in enumerate(osr.level_dimensions):
        ds = osr.level_downsamples[level]
        for what, x, y, w, h in level_regions(lw, lh, tile):
            out.append((level, what, round(x * ds), round(y * ds), w, h))
    return out


def assert_same(got, want, msg):
    assert got.shape == want.shape and got.dtype == np.uint8, f"{msg}: {got.shape} {got.dtype}"
    if not np.array_equal(got, want):
        d = np.abs(got.astype(np.int16) - want)
        yx = np.argwhere(d.max(-1) > 0)
        raise AssertionError(f"{msg}: {len(yx)} pixels differ (max {d.max()}), first at y, x = {tuple(yx[0])}")


# -- the references themselves (no direct reader needed) --------------------------------------------------
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_references_agree(files, refs, name):
    """OpenSlide opens every layout as the vendor it should; its level 0 is the stored level 0 (and what
    was written, for lossless codecs); at level k from the origin (whole pixels) it equals the stored level."""
    w = _layout(files, name)
    lay = w.layout
    assert openslide.OpenSlide.detect_format(str(w.path)) == ("aperio" if lay.svs else "generic-tiff")
    osr, stored = refs(name)
    assert osr.level_count == len(lay.downsamples)
    W, H = osr.dimensions
    level0 = openslide_region(osr, 0, 0, 0, W, H)
    assert_same(stored[0], level0, f"{name}: stored level 0 vs OpenSlide")
    for k in range(osr.level_count):
        if lay.lossless:
            assert_same(stored[k], w.levels[k], f"{name}: stored level {k} vs written")
        lw, lh = osr.level_dimensions[k]
        assert_same(openslide_region(osr, 0, 0, k, lw, lh), stored[k], f"{name}: OpenSlide level {k} vs stored")


def test_j2k_33003_hard_triples_reference(tmp_path):
    """tiff_layouts' integer YCbCr -> RGB is OpenSlide's, on the triples where a rounding slip shows."""
    path = tmp_path / "triples.svs"
    rgb = write_j2k_triples(path)
    with openslide.OpenSlide(str(path)) as osr:
        assert_same(openslide_region(osr, 0, 0, 0, 256, 256), rgb, "OpenSlide 33003 vs tiff_layouts formula")


def test_stripped_tiff_is_not_read_directly(tmp_path):
    """A stripped (untiled) TIFF: OpenSlide does not open it and the direct reader must not claim it."""
    from slide_fixtures import he_like

    rgb = he_like(300, 401, seed=3)
    path = tmp_path / "stripped.tif"
    tifffile.imwrite(path, rgb, photometric="rgb", rowsperstrip=16, compression="zlib")
    assert openslide.OpenSlide.detect_format(str(path)) is None
    with open_slide(path) as slide:
        assert getattr(slide, "reader", None) != "direct"
        assert_same(slide.read_region(-5, 290, 0, 50, 20), padded(rgb, -5, 290, 50, 20), "stripped TIFF")


# -- the direct reader ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", DIRECT_LAYOUTS)
def test_direct_reader_serves_layout_with_openslide_geometry(files, refs, name):
    w = _layout(files, name)
    osr, _ = refs(name)
    with open_slide(w.path) as slide:
        assert slide.reader == "direct", f"{name}: read by {slide.reader!r} ({slide.reader_note})"
        assert slide.reader_note is None
        assert slide.vendor == osr.properties["openslide.vendor"]
        assert slide.level_dimensions == tuple(osr.level_dimensions)
        assert slide.level_downsamples == tuple(osr.level_downsamples)
        mpp = (float(osr.properties[openslide.PROPERTY_NAME_MPP_X]) +
               float(osr.properties[openslide.PROPERTY_NAME_MPP_Y])) / 2
        assert slide.mpp == pytest.approx(mpp, rel=1e-12)
        power = osr.properties.get(openslide.PROPERTY_NAME_OBJECTIVE_POWER)
        assert slide.objective_power == (None if power is None else float(power))


@pytest.mark.parametrize("name", DIRECT_LAYOUTS)
def test_direct_reads_equal_references(files, refs, name):
    """Aligned, unaligned, multi-tile, edge, outside and negative regions at every level."""
    w = _layout(files, name)
    osr, stored = refs(name)
    with open_slide(w.path) as slide:
        assert slide.reader == "direct"
        for level, what, x, y, rw, rh in cases(osr, w.layout.tile):
            got = slide.read_region(x, y, level, rw, rh)
            assert_same(got, reference(osr, stored, x, y, level, rw, rh),
                        f"{name} level {level} {what} at l0 ({x}, {y}) size {rw}x{rh}")


def test_direct_33003_matches_openslide_on_hard_triples(tmp_path):
    path = tmp_path / "triples.svs"
    rgb = write_j2k_triples(path)
    with open_slide(path) as slide:
        assert slide.reader == "direct"
        assert_same(slide.read_region(0, 0, 0, 256, 256), rgb, "direct 33003 vs OpenSlide's integer YCbCr->RGB")


@pytest.mark.parametrize("name", ["svs_jpeg_rgb_tables_240", "svs_j2k_ycbcr_240", "tif_deflate_256"])
def test_four_threads_read_the_same_pixels(files, refs, name):
    w = _layout(files, name)
    osr, stored = refs(name)
    rng = np.random.default_rng(7)
    jobs = []
    for _ in range(48):
        level = int(rng.integers(osr.level_count))
        lw, lh = osr.level_dimensions[level]
        ds = osr.level_downsamples[level]
        x, y = int(rng.integers(-20, lw)), int(rng.integers(-20, lh))
        jobs.append((round(x * ds), round(y * ds), level, int(rng.integers(1, 300)), int(rng.integers(1, 300))))
    want = [reference(osr, stored, x, y, lv, rw, rh) for x, y, lv, rw, rh in jobs]
    with open_slide(w.path) as slide:
        assert slide.reader == "direct"
        start = threading.Barrier(4)

        def run(shift):
            start.wait()
            order = jobs[shift:] + jobs[:shift]
            return shift, [slide.read_region(*job) for job in order]

        with ThreadPoolExecutor(4) as pool:
            for shift, got in pool.map(run, [0, 12, 24, 36]):
                for i, g in enumerate(got):
                    j = (i + shift) % len(jobs)
                    assert_same(g, want[j], f"{name} thread shift {shift} job {jobs[j]}")


CORRUPT = ["svs_jpeg_rgb_tables_240", "svs_jpeg_ycbcr_tables_256", "tif_jpeg_ycbcr_240", "svs_j2k_ycbcr_240",
           "svs_j2k_rgb_256", "tif_deflate_256", "tif_lzw_512", "tif_zstd_256"]


@pytest.mark.parametrize("name", CORRUPT)
def test_corrupt_tile_raises_slide_error_naming_file_and_tile(files, refs, tmp_path, name):
    w = _layout(files, name)
    t = w.layout.tile
    bad = tmp_path / ("bad_" + w.path.name)
    shutil.copyfile(w.path, bad)
    with tifffile.TiffFile(bad) as tf:
        page = [p for p in tf.pages if p.is_tiled][0]
        cols = -(-page.imagewidth // t)
        col, row = 1, 1 if cols > 1 else 0
        index = row * cols + col
        off, n = page.dataoffsets[index], page.databytecounts[index]
    garbage = b"\x00\x11" + np.random.default_rng(1).integers(0, 256, n - 2, dtype=np.uint8).tobytes()
    with open(bad, "r+b") as fh:
        fh.seek(off)
        fh.write(garbage)
    osr, _ = refs(name)
    with open_slide(bad) as slide:
        assert slide.reader == "direct"
        for _ in range(2):  # a failed tile is not cached as pixels
            with pytest.raises(SlideError) as info:
                slide.read_region(col * t + 3, row * t + 5, 0, 40, 30)
            msg = str(info.value)
            assert bad.name in msg, msg
            assert re.search(r"level\W*0\b", msg), f"no level in: {msg}"
            names_tile = (re.search(rf"\b{index}\b", msg) or
                          (re.search(rf"col\w*\W*{col}\b", msg) and re.search(rf"row\w*\W*{row}\b", msg)))
            assert names_tile, f"tile (col {col}, row {row}, index {index}) not named in: {msg}"
        # the good tiles still read, exactly
        assert_same(slide.read_region(0, 0, 0, t, t), openslide_region(osr, 0, 0, 0, t, t), f"{name} good tile")


@pytest.mark.parametrize("name", FALLBACK_LAYOUTS)
def test_unservable_layout_falls_back_to_openslide(files, refs, name):
    """Palette and 16-bit RGB tiled TIFFs: OpenSlide reads them (libtiff's RGBA path); the direct reader
    declines them with a note and the slide reads exactly as OpenSlide does."""
    w = _layout(files, name)
    osr, _ = refs(name)
    with open_slide(w.path) as slide:
        assert slide.reader == "openslide"
        assert isinstance(slide.reader_note, str) and slide.reader_note.strip()
        assert slide.level_dimensions == tuple(osr.level_dimensions)
        assert slide.level_downsamples == tuple(osr.level_downsamples)
        for level, what, x, y, rw, rh in cases(osr, w.layout.tile):
            assert_same(slide.read_region(x, y, level, rw, rh), openslide_region(osr, x, y, level, rw, rh),
                        f"{name} level {level} {what}")
