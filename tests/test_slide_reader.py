"""open_slide over OpenSlide (generic TIFF, SVS), plain TIFF/PNG/JPEG and arrays, checked against the
pixels written, openslide-python's own reads and hand-computed geometry."""
from __future__ import annotations

import shutil
import threading
from pathlib import Path

import numpy as np
import openslide
import pytest
import tifffile
from PIL import Image

from fastgicn.errors import ConfigError, SlideError
from fastgicn.slide import ImageSlide, OpenSlideSlide, open_slide
from slide_fixtures import he_like, padded, write_pyramid

W0, H0 = 1000, 700   # not a multiple of the 256 tile: edge tiles are partial


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("slides")
    level0 = he_like(H0, W0)
    out = {"dir": d, "level0": level0}
    out["levels"] = write_pyramid(d / "generic.tif", level0)
    write_pyramid(d / "aperio.svs", level0, svs=True)
    write_pyramid(d / "aperio_jpeg.svs", level0, svs=True, jpeg=True)
    return out



REGIONS = [(0, 0, 256, 256), (37, 11, 300, 190), (900, 600, 256, 256), (-40, -3, 100, 80), (2000, 10, 16, 16),
           (999, 699, 1, 1)]


@pytest.mark.parametrize("reader", ["direct", "openslide"])
@pytest.mark.parametrize("name", ["generic.tif", "aperio.svs"])
def test_reads_match_written_levels(files, name, reader):
    with open_slide(files["dir"] / name, reader=reader) as slide:
        assert slide.reader == reader
        assert isinstance(slide, OpenSlideSlide) == (reader == "openslide")
        assert slide.vendor == ("aperio" if name.endswith(".svs") else "generic-tiff")
        assert slide.dimensions == (W0, H0)
        assert slide.level_count == 3
        assert slide.level_dimensions == ((1000, 700), (500, 350), (250, 175))
        assert slide.level_downsamples == (1.0, 2.0, 4.0)
        assert slide.mpp == pytest.approx(0.25)
        assert slide.objective_power == (40.0 if name.endswith(".svs") else None)
        for level, arr in enumerate(files["levels"]):
            ds = 2 ** level
            for x, y, w, h in REGIONS:
                # level-0 origin, size in level pixels: the level-`level` crop starts at (x / ds, y / ds).
                # (OpenSlide interpolates origins that are not multiples of ds; the grid never asks for one.)
                x, y = x // ds * ds, y // ds * ds
                got = slide.read_region(x, y, level, w, h)
                np.testing.assert_array_equal(got, padded(arr, x // ds, y // ds, w, h),
                                              err_msg=f"{name} level {level} region {(x, y, w, h)}")


def test_mpp_argument_overrides_the_file(files):
    with open_slide(files["dir"] / "aperio.svs", mpp=0.5) as slide:
        assert slide.mpp == 0.5 and slide.level_for(1.0) == 1
    with open_slide(files["dir"] / "generic.tif") as slide:
        assert slide.mpp_xy == pytest.approx((0.25, 0.25)) and slide.level_mpp(1) == pytest.approx(0.5)


def test_agrees_with_openslide_python(files):
    # openslide-python un-premultiplies to RGBA through PIL: an independent path to the same pixels
    path = files["dir"] / "aperio.svs"
    ref_slide = openslide.OpenSlide(path)
    with open_slide(path) as slide:
        for level in range(3):
            for x, y, w, h in REGIONS[:4]:
                x, y = x // 4 * 4, y // 4 * 4
                rgba = np.asarray(ref_slide.read_region((x, y), level, (w, h))).astype(np.float64)
                a = rgba[..., 3:] / 255.0
                ref = np.rint(rgba[..., :3] * a + 255.0 * (1 - a))
                got = slide.read_region(x, y, level, w, h)
                assert np.abs(got.astype(np.float64) - ref).max() <= 1
    ref_slide.close()


def test_jpeg_svs_within_jpeg_tolerance(files):
    with open_slide(files["dir"] / "aperio_jpeg.svs") as slide:
        got = slide.read_region(0, 0, 0, W0, H0).astype(np.int16)
        diff = np.abs(got - files["level0"])
        assert diff.mean() < 1.5 and np.percentile(diff, 99.9) <= 8, (diff.mean(), diff.max())


def test_read_into_counts_background_and_fills_batch_slot(files):
    batch = np.zeros((3, 256, 256, 3), np.uint8)
    with open_slide(files["dir"] / "generic.tif") as slide:
        for slot, (x, y) in enumerate([(0, 0), (900, 600), (5000, 5000)]):
            n = slide.read_into(batch[slot], x, y, 0, 220)
            ref = padded(files["level0"], x, y, 256, 256)
            np.testing.assert_array_equal(batch[slot], ref)
            assert n == int(np.all(ref > 220, axis=-1).sum())
        assert n == 256 * 256   # entirely outside the slide: all padding
        # a region larger than the per-thread scratch buffer kept between reads (4 Mpx)
        np.testing.assert_array_equal(slide.read_region(-50, -60, 0, 2100, 2050),
                                      padded(files["level0"], -50, -60, 2100, 2050))
        # a sub-rectangle of a slot: out= takes any view with packed pixels
        out = slide.read_region(10, 20, 1, 100, 50, out=batch[0, 3:53, 7:107])
        assert out.base is not None
        np.testing.assert_array_equal(batch[0, 3:53, 7:107], padded(files["levels"][1], 5, 10, 100, 50))
        with pytest.raises(ConfigError, match="100 x 50|50 x 100"):
            slide.read_region(0, 0, 0, 100, 50, out=batch[0, :50, :99])
        with pytest.raises(ConfigError, match="strides"):
            slide.read_into(np.zeros((8, 16, 3), np.uint8)[:, ::2], 0, 0)
        with pytest.raises(ConfigError, match="levels 0..2"):
            slide.read_region(0, 0, 3, 4, 4)
        with pytest.raises(ConfigError, match="l0_x"):
            slide.read_region(1.5, 0, 0, 4, 4)


def test_level_selection_by_mpp_and_magnification(files):
    with open_slide(files["dir"] / "aperio.svs") as svs, open_slide(files["dir"] / "generic.tif") as gen:
        for slide in (svs, gen):
            got = [slide.level_for(m) for m in (0.25, 0.5, 1.0, 0.27, 0.23, 0.55, 1.1)]
            assert got == [0, 1, 2, 0, 0, 1, 2]
            assert slide.level_mpp(2) == pytest.approx(1.0)
            with pytest.raises(ConfigError, match="no level within 15%"):
                slide.level_for(0.7)
            with pytest.raises(ConfigError, match="does not upsample"):
                slide.level_for(0.125)
            assert slide.level_for(0.3, tolerance=0.25) == 0
        # magnification: the SVS records 40x; the generic TIFF does not, so 40x = 0.25 um/px is used
        assert [svs.level_for(magnification=m) for m in (40, 20, 10)] == [0, 1, 2]
        assert [gen.level_for(magnification=m) for m in (40, 20, 10)] == [0, 1, 2]
        with pytest.raises(ConfigError, match="30x"):
            svs.level_for(magnification=30)
        with pytest.raises(ConfigError, match="exactly one"):
            svs.level_for(0.25, magnification=40)
        # OpenSlide's own rule is the reference for best_level_for_downsample
        ref = openslide.OpenSlide(files["dir"] / "aperio.svs")
        for ds in (0.5, 1, 1.5, 1.99, 2, 3, 4, 4.01, 100):
            assert svs.best_level_for_downsample(ds) == ref.get_best_level_for_downsample(ds)
        ref.close()
    bare = open_slide(np.zeros((10, 10, 3), np.uint8))
    with pytest.raises(ConfigError, match="mpp="):
        bare.level_for(0.25)
    with pytest.raises(ConfigError, match="mpp="):
        bare.level_for(magnification=40)
    assert open_slide(np.zeros((10, 10, 3), np.uint8), mpp=0.5).level_for(magnification=20) == 0


def test_thumbnail_and_downsampled_come_from_low_levels(files, monkeypatch):
    with open_slide(files["dir"] / "generic.tif") as slide:
        levels_read = []
        original = slide._read
        monkeypatch.setattr(slide, "_read", lambda out, x, y, level, t: levels_read.append(level) or
                            original(out, x, y, level, t))
        # factor 2 is level 1 exactly, padded white to ceil(size / 2)
        np.testing.assert_array_equal(slide.downsampled(2), files["levels"][1])
        # factor 8 = level 2 (downsample 4, 250 x 175) then 2 x 2 means; 175 rows -> 88, half of the
        # last row padding
        lvl2 = padded(files["levels"][2], 0, 0, 250, 176).astype(np.uint32)
        ref = (lvl2.reshape(88, 2, 125, 2, 3).sum(axis=(1, 3)) + 2) // 4
        np.testing.assert_array_equal(slide.downsampled(8), ref)
        # a factor that is not a multiple of a level's downsample is box-resized from the best level
        assert slide.downsampled(3).shape == (234, 334, 3)
        thumb = slide.thumbnail(200)
        assert thumb.shape == (140, 200, 3)
        assert set(levels_read) == {1, 2}
        # the last result is kept, read-only (the tissue mask and the overlay ask for the same factor)
        first = slide.downsampled(3)
        n_reads = len(levels_read)
        assert slide.downsampled(3) is first and len(levels_read) == n_reads and not first.flags.writeable
        assert slide.downsampled(8) is not first and len(levels_read) > n_reads
        np.testing.assert_array_equal(slide.read_level(2), files["levels"][2])
        with pytest.raises(ConfigError, match="max_pixels"):
            slide.read_level(0, max_pixels=1000)


def test_array_slides(files):
    level0 = files["level0"]
    with open_slide(level0, mpp=0.25) as slide:
        assert isinstance(slide, ImageSlide) and slide.vendor == "array"
        assert slide.dimensions == (W0, H0) and slide.level_count == 1 and slide.mpp == 0.25
        for x, y, w, h in REGIONS:
            np.testing.assert_array_equal(slide.read_region(x, y, 0, w, h), padded(level0, x, y, w, h))
    # a non-contiguous view (BGR -> RGB by a negative stride) reads as the pixels it shows
    bgr = np.ascontiguousarray(level0[..., ::-1])
    view = bgr[..., ::-1]
    with open_slide(view) as slide:
        np.testing.assert_array_equal(slide.read_region(37, 11, 0, 300, 190),
                                      padded(level0, 37, 11, 300, 190))
        assert slide.mpp is None
    for bad in [np.zeros((4, 4, 3), np.float32), np.zeros((4, 4), np.uint8), np.zeros((4, 4, 4), np.uint8),
                np.zeros((0, 4, 3), np.uint8)]:
        with pytest.raises(SlideError, match="array slide"):
            open_slide(bad)
    with pytest.raises(ConfigError, match="mpp"):
        open_slide(level0, mpp=-1)
    with pytest.raises(ConfigError, match="path or an H x W x 3"):
        open_slide(42)


def test_plain_images(files, tmp_path):
    level0 = files["level0"]
    Image.fromarray(level0).save(tmp_path / "rgb.png")
    with open_slide(tmp_path / "rgb.png") as slide:
        assert slide.vendor == "png" and slide.level_count == 1
        np.testing.assert_array_equal(slide.read_region(0, 0, 0, W0, H0), level0)
    # RGBA is composited on white; grey is repeated to three channels
    alpha = np.tile(np.arange(W0, dtype=np.uint16) * 255 // (W0 - 1), (H0, 1)).astype(np.uint8)
    Image.fromarray(np.dstack([level0, alpha])).save(tmp_path / "rgba.png")
    a = alpha[..., None] / 255.0
    ref = np.rint(level0 * a + 255 * (1 - a)).astype(np.uint8)
    np.testing.assert_array_equal(open_slide(tmp_path / "rgba.png").read_region(0, 0, 0, W0, H0), ref)
    Image.fromarray(level0[..., 1]).save(tmp_path / "grey.png")
    np.testing.assert_array_equal(open_slide(tmp_path / "grey.png").read_region(5, 5, 0, 20, 20),
                                  np.repeat(level0[5:25, 5:25, 1:2], 3, axis=2))
    Image.fromarray(level0).save(tmp_path / "he.jpg", quality=95)
    with open_slide(tmp_path / "he.jpg", mpp=0.5) as slide:
        assert slide.vendor == "jpeg" and slide.mpp == 0.5
        assert np.abs(slide.read_region(0, 0, 0, W0, H0).astype(int) - level0).mean() < 2
    # a stripped (untiled) TIFF is not for OpenSlide: tifffile, memory-mapped when uncompressed
    tifffile.imwrite(tmp_path / "plain.tif", level0, resolution=(1e4 / 0.5, 1e4 / 0.5),
                     resolutionunit="CENTIMETER")
    with open_slide(tmp_path / "plain.tif") as slide:
        assert slide.vendor == "tiff" and isinstance(slide._rgb, np.memmap)
        assert slide.mpp == pytest.approx(0.5)
        np.testing.assert_array_equal(slide.read_region(900, 600, 0, 256, 256),
                                      padded(level0, 900, 600, 256, 256))
    tifffile.imwrite(tmp_path / "plainz.tif", level0, compression="zlib", resolution=(72, 72),
                     resolutionunit="INCH")
    with open_slide(tmp_path / "plainz.tif") as slide:
        assert slide.mpp is None   # 72 dpi is a placeholder, not a microscope's resolution
        np.testing.assert_array_equal(slide.read_region(0, 0, 0, W0, H0), level0)
    tifffile.imwrite(tmp_path / "sixteen.tif", level0.astype(np.uint16))
    with pytest.raises(SlideError, match="sixteen.tif.*uint16"):
        open_slide(tmp_path / "sixteen.tif")


def _truncate(src: Path, dst: Path, fraction: float) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * fraction)])
    return dst


@pytest.mark.parametrize("fraction", [0.01, 0.5, 0.9, 0.999])
def test_truncated_pyramid_raises_slide_error(files, tmp_path, fraction):
    path = _truncate(files["dir"] / "generic.tif", tmp_path / "cut.tif", fraction)
    with pytest.raises(SlideError, match=r"cut\.tif.*(truncated|corrupt)") as info:
        with open_slide(path) as slide:
            slide.read_region(0, 0, 0, W0, H0)
    assert info.value.__cause__ is None   # no ctypes/OpenSlide traceback chained under ours


@pytest.mark.parametrize("reader, message", [
    ("openslide", r"bad_tile\.svs.*reading 64x64 at level 0 from \(0, 0\)"),
    ("direct", r"bad_tile\.svs: level 0 tile \(column 0, row 0\) at byte \d+ is corrupt")])
def test_corrupt_tile_data_raises_slide_error_on_read(files, tmp_path, reader, message):
    path = tmp_path / "bad_tile.svs"
    shutil.copy(files["dir"] / "aperio.svs", path)
    with tifffile.TiffFile(path) as tf:
        offset, count = tf.pages[0].dataoffsets[0], tf.pages[0].databytecounts[0]
    data = bytearray(path.read_bytes())
    data[offset:offset + count] = b"\x17" * count        # garbage where tile (0, 0) of level 0 was
    path.write_bytes(bytes(data))
    with open_slide(path, reader=reader) as slide:
        np.testing.assert_array_equal(slide.read_region(512, 512, 0, 64, 64),
                                      padded(files["level0"], 512, 512, 64, 64))
        with pytest.raises(SlideError, match=message) as info:
            slide.read_region(0, 0, 0, 64, 64)
        assert info.value.__cause__ is None


def test_missing_directory_empty_junk_and_truncated_png(files, tmp_path):
    cases = {
        tmp_path / "nope.svs": "no such file",
        tmp_path: "is a directory",
    }
    (tmp_path / "empty.svs").write_bytes(b"")
    cases[tmp_path / "empty.svs"] = "empty"
    (tmp_path / "junk.svs").write_bytes(b"this is not a slide" * 10)
    cases[tmp_path / "junk.svs"] = "not a format"
    Image.fromarray(files["level0"]).save(tmp_path / "ok.png")
    _truncate(tmp_path / "ok.png", tmp_path / "cut.png", 0.5)
    cases[tmp_path / "cut.png"] = "truncated"
    for path, reason in cases.items():
        with pytest.raises(SlideError) as info:
            open_slide(path)
        assert str(path) in str(info.value) and reason in str(info.value), str(info.value)


@pytest.mark.parametrize("handles", ["shared", "per_thread", "direct"])
def test_threads_read_the_same_pixels(files, handles):
    regions = [(x, y) for y in range(0, H0, 128) for x in range(0, W0, 128)]
    reader = "direct" if handles == "direct" else "openslide"
    with open_slide(files["dir"] / "aperio.svs", handles="shared" if reader == "direct" else handles,
                    reader=reader) as slide:
        expect = {r: slide.read_region(r[0], r[1], 0, 160, 160) for r in regions}
        errors = []

        def work(offset):
            try:
                for i in range(len(regions)):
                    r = regions[(i + offset) % len(regions)]
                    if not np.array_equal(slide.read_region(r[0], r[1], 0, 160, 160), expect[r]):
                        errors.append(r)
            except Exception as exc:   # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(k * 7,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        if reader == "openslide":
            assert len(slide._handles) == (4 + 1 if handles == "per_thread" else 1)
    assert slide.closed and getattr(slide, "_handles", []) == [] and getattr(slide, "_fd", None) is None
    with pytest.raises(SlideError, match="closed"):
        slide.read_region(0, 0, 0, 4, 4)
    slide.close()   # idempotent


def test_close_waits_for_reads_in_flight(files):
    slide = open_slide(files["dir"] / "generic.tif")
    started, release = threading.Event(), threading.Event()
    original = slide._read

    def slow_read(*args):
        started.set()
        release.wait(5)
        return original(*args)

    slide._read = slow_read
    result = {}
    reader = threading.Thread(target=lambda: result.setdefault("rgb", slide.read_region(0, 0, 0, 8, 8)))
    reader.start()
    started.wait(5)
    closer = threading.Thread(target=slide.close)
    closer.start()
    closer.join(0.2)
    assert closer.is_alive()          # close() is waiting for the read
    release.set()
    reader.join(5)
    closer.join(5)
    assert not closer.is_alive() and slide.closed
    np.testing.assert_array_equal(result["rgb"], files["level0"][:8, :8])
