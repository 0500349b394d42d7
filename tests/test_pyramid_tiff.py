"""The streaming pyramidal TIFF writer, checked through OpenSlide and tifffile against NumPy references."""
from __future__ import annotations

import errno
import io
import os
import tracemalloc

import numpy as np
import openslide
import pytest
import tifffile

from fastgicn.errors import ConfigError, SlideError
from fastgicn.outputs import tiff as pyramid_tiff
from fastgicn.outputs.tiff import pyramid_sizes, write_pyramid
from slide_fixtures import reference_reduce


def smooth_rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A JPEG-friendly test image: gradients plus soft blobs (no high-frequency texture)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    wave = np.sin(xx / 37.0) * np.cos(yy / 53.0)
    img = np.stack([60 + 150 * xx / w, 60 + 150 * yy / h, 120 + 60 * wave], -1)
    for _ in range(12):
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(20, 90)
        img -= 50 * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))[..., None]
    return np.clip(img, 0, 255).astype(np.uint8)


def tile_reader(img: np.ndarray, calls: list | None = None):
    def read_tile(x, y, w, h):
        if calls is not None:
            calls.append((x, y, w, h))
        return img[y:y + h, x:x + w]
    return read_tile


def test_pyramid_sizes_halve_until_long_side_fits():
    sizes = pyramid_sizes(100_000, 100_000)
    assert sizes[0] == (100_000, 100_000) and sizes[-1] == (782, 782) and len(sizes) == 8
    assert pyramid_sizes(1001, 703, min_level_size=100) == [(1001, 703), (501, 352), (251, 176), (126, 88),
                                                            (63, 44)]
    assert pyramid_sizes(800, 600) == [(800, 600)]


@pytest.mark.parametrize("aperio", [True, False], ids=["svs", "generic-tiff"])
def test_rgb_pyramid_opens_in_openslide(tmp_path, aperio):
    h, w = 703, 1001  # odd on both axes, so every level has a cut edge
    img = smooth_rgb(h, w)
    path = tmp_path / ("slide.svs" if aperio else "slide.tif")
    calls = []
    levels = write_pyramid(path, w, h, tile_reader(img, calls), tile=128, mpp=0.25, aperio=aperio, app_mag=40,
                           min_level_size=100)
    # each level-0 tile pulled exactly once, row-major, clipped at the edges
    expected = [(x, y, min(128, w - x), min(128, h - y)) for y in range(0, h, 128) for x in range(0, w, 128)]
    assert calls == expected

    slide = openslide.OpenSlide(path)
    assert slide.properties["openslide.vendor"] == ("aperio" if aperio else "generic-tiff")
    assert slide.level_count == 5 == len(levels)
    assert slide.level_dimensions == ((1001, 703), (501, 352), (251, 176), (126, 88), (63, 44))
    for got, want in zip(slide.level_downsamples, [1, 2, 4, 8, 16]):
        assert got == pytest.approx(want, rel=0.02)
    assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(0.25)
    assert float(slide.properties["openslide.mpp-y"]) == pytest.approx(0.25)
    if aperio:
        assert float(slide.properties["openslide.objective-power"]) == 40
        assert float(slide.properties["aperio.AppMag"]) == 40
    level0 = np.asarray(slide.read_region((0, 0), 0, (w, h)))[..., :3].astype(np.int16)
    assert np.abs(level0 - img).mean() < 1.5  # JPEG q90

    # each level is the 2x2 area average of the exact level above (JPEG error only)
    ideal = img
    for k in range(1, slide.level_count):
        ideal = reference_reduce(ideal, "mean")
        got = np.asarray(slide.read_region((0, 0), k, slide.level_dimensions[k]))[..., :3].astype(np.int16)
        assert got.shape == ideal.shape
        assert np.abs(got - ideal).mean() < 2.0, k


def test_levels_are_in_the_main_ifd_chain_with_resolution(tmp_path):
    img = smooth_rgb(600, 900)
    path = tmp_path / "chain.tif"
    write_pyramid(path, 900, 600, tile_reader(img), tile=256, mpp=0.5, min_level_size=250,
                  description="a test image")
    with tifffile.TiffFile(path) as tif:
        assert len(tif.pages) == 3  # 900, 450, 225 wide: every level is a top-level page
        for k, page in enumerate(tif.pages):
            assert page.is_tiled and page.tilewidth == 256 and page.tilelength == 256
            assert "SubIFDs" not in page.tags
            assert page.subfiletype == (0 if k == 0 else 1)  # FILETYPE_REDUCEDIMAGE below level 0
            assert page.tags["ResolutionUnit"].value == tifffile.RESUNIT.CENTIMETER
            num, den = page.tags["XResolution"].value
            assert 1e4 / (num / den) == pytest.approx(0.5 * 900 / page.imagewidth, rel=1e-6)
            assert page.compression == tifffile.COMPRESSION.JPEG
        assert tif.pages[0].description == "a test image"


def test_lossless_rgb_levels_are_exact_area_averages(tmp_path):
    h, w = 517, 389
    img = np.random.default_rng(1).integers(0, 256, (h, w, 3), dtype=np.uint8)
    path = tmp_path / "exact.tif"
    write_pyramid(path, w, h, tile_reader(img), tile=64, compression="deflate", min_level_size=20)
    ideal = img
    with tifffile.TiffFile(path) as tif:
        assert len(tif.pages) == len(pyramid_sizes(w, h, 20)) == 6
        for k, page in enumerate(tif.pages):
            assert np.array_equal(page.asarray(), ideal), f"level {k}"
            ideal = reference_reduce(ideal, "mean")


@pytest.mark.parametrize("compression", ["deflate", "lzw"])
def test_label_mask_stays_binary_and_exact_at_every_level(tmp_path, compression):
    h, w = 611, 777
    yy, xx = np.mgrid[0:h, 0:w]
    mask = np.zeros((h, w), np.uint8)
    mask[((xx - 300) ** 2 + (yy - 260) ** 2) < 150 ** 2] = 255
    mask[(xx % 7 == 0) & (yy > 500)] = 255  # thin lines: ties and 1-pixel structures
    mask[3, 5] = 255
    path = tmp_path / "mask.tif"
    write_pyramid(path, w, h, tile_reader(mask), channels=1, tile=128, compression=compression,
                  downsample="majority", mpp=0.25, min_level_size=60)
    slide = openslide.OpenSlide(path)
    ideal = mask
    for k in range(slide.level_count):
        got = np.asarray(slide.read_region((0, 0), k, slide.level_dimensions[k]))
        assert np.array_equal(got[..., 0], ideal), f"level {k}"
        assert set(np.unique(got[..., 0])) <= {0, 255}
        assert np.array_equal(tifffile.imread(path, key=k), ideal)
        ideal = reference_reduce(ideal, "majority")


def test_max_mode_keeps_every_foreground_pixel(tmp_path):
    h, w = 300, 500
    img = np.zeros((h, w), np.uint8)
    img[np.random.default_rng(2).random((h, w)) < 0.01] = 200  # isolated pixels
    path = tmp_path / "max.tif"
    write_pyramid(path, w, h, tile_reader(img), channels=1, tile=64, compression="deflate", downsample="max",
                  min_level_size=40)
    ideal = img
    with tifffile.TiffFile(path) as tif:
        for k, page in enumerate(tif.pages):
            assert np.array_equal(page.asarray(), ideal), f"level {k}"
            padded = np.pad(ideal, ((0, ideal.shape[0] % 2), (0, ideal.shape[1] % 2)))
            ideal = padded.reshape(padded.shape[0] // 2, 2, padded.shape[1] // 2, 2).max(axis=(1, 3))
        assert (tif.pages[-1].asarray() == 200).sum() > 0


def test_memory_is_bounded_by_a_band_not_the_image(tmp_path):
    """A 16384 x 4096 image (64 MB): the writer's peak allocations stay near one band of tiles per level."""
    w, h, tile = 16384, 4096, 256
    pattern = (np.add.outer(np.arange(tile), np.arange(tile)) % 251).astype(np.uint8)

    def read_tile(x, y, tw, th):
        return pattern[:th, :tw]

    tracemalloc.start()
    try:
        write_pyramid(tmp_path / "big.tif", w, h, read_tile, channels=1, tile=tile, compression="deflate")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    band_bytes = tile * w  # one band of tiles of level 0
    assert peak < 2 * band_bytes + 4 * 2**20, f"peak {peak / 2**20:.1f} MiB"
    assert peak < w * h / 8
    assert openslide.OpenSlide(tmp_path / "big.tif").level_dimensions[0] == (w, h)


def test_a_failure_mid_write_leaves_nothing_and_keeps_the_old_file(tmp_path):
    img = smooth_rgb(512, 512)
    path = tmp_path / "slide.tif"
    path.write_bytes(b"previous complete file")
    calls = []

    def read_tile(x, y, w, h):
        calls.append((x, y))
        if len(calls) == 7:
            raise RuntimeError("simulated crash while rendering")
        return img[y:y + h, x:x + w]

    with pytest.raises(RuntimeError, match="simulated crash"):
        write_pyramid(path, 512, 512, read_tile, tile=128, min_level_size=64)
    assert path.read_bytes() == b"previous complete file"
    assert sorted(os.listdir(tmp_path)) == ["slide.tif"]  # no .partial or .spool left behind


def test_a_source_read_error_is_not_reported_as_a_write_error(tmp_path):
    def read_tile(x, y, w, h):
        raise FileNotFoundError(errno.ENOENT, "source tile missing", "stitch.npy")

    with pytest.raises(FileNotFoundError, match="source tile missing"):
        write_pyramid(tmp_path / "out.tif", 256, 256, read_tile, channels=1, compression="deflate")
    assert os.listdir(tmp_path) == []


class _DiskFullAfter(io.FileIO):
    """A file that accepts `budget` bytes and then fails like a full disk."""

    def __init__(self, path, budget):
        super().__init__(path, "w")
        self.budget = budget

    def write(self, data):
        if self.budget < len(data):
            raise OSError(errno.ENOSPC, "No space left on device")
        self.budget -= len(data)
        return super().write(data)


def test_full_disk_raises_slide_error_naming_the_file_and_cleans_up(tmp_path, monkeypatch):
    monkeypatch.setattr(pyramid_tiff, "_open_output",
                        lambda p: io.BufferedWriter(_DiskFullAfter(p, 20_000), buffer_size=4096))
    img = smooth_rgb(512, 512)
    path = tmp_path / "full.svs"
    with pytest.raises(SlideError, match=r"disk full while writing .*full\.svs"):
        write_pyramid(path, 512, 512, tile_reader(img), tile=128, aperio=True, mpp=0.25, min_level_size=64)
    assert os.listdir(tmp_path) == []


def test_bigtiff_is_readable(tmp_path):
    img = smooth_rgb(300, 400)
    path = tmp_path / "big.svs"
    write_pyramid(path, 400, 300, tile_reader(img), tile=128, aperio=True, mpp=0.25, app_mag=40, bigtiff=True,
                  min_level_size=100)
    with tifffile.TiffFile(path) as tif:
        assert tif.is_bigtiff
    slide = openslide.OpenSlide(path)
    assert slide.level_dimensions == ((400, 300), (200, 150), (100, 75))


@pytest.mark.parametrize("kwargs, message", [
    (dict(tile=100), "multiple of 16"),
    (dict(channels=4), "channels=4"),
    (dict(compression="webp"), "compression 'webp'"),
    (dict(downsample="majority"), "lossless"),
    (dict(downsample="median", compression="deflate"), "downsample 'median'"),
    (dict(quality=0), "quality=0"),
    (dict(mpp=-1.0), "mpp=-1.0"),
    (dict(app_mag=0.0), "app_mag=0.0"),
])
def test_bad_arguments_raise_config_error(tmp_path, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        write_pyramid(tmp_path / "x.tif", 64, 64, lambda x, y, w, h: np.zeros((h, w, 3), np.uint8), **kwargs)
    assert os.listdir(tmp_path) == []


def test_wrong_tile_from_the_callback_names_the_tile(tmp_path):
    with pytest.raises(ConfigError, match=r"read_tile\(0, 0, 64, 64\) returned float64 \(64, 64, 3\)"):
        write_pyramid(tmp_path / "x.tif", 64, 64, lambda x, y, w, h: np.zeros((h, w, 3)), tile=64)
    assert os.listdir(tmp_path) == []


def test_missing_directory_raises_slide_error(tmp_path):
    with pytest.raises(SlideError, match="does not exist"):
        write_pyramid(tmp_path / "nowhere" / "x.tif", 64, 64,
                      lambda x, y, w, h: np.zeros((h, w, 3), np.uint8))


def test_pyramid_sizes_with_a_level_step_of_four():
    assert pyramid_sizes(20000, 15000, level_step=4) == [(20000, 15000), (5000, 3750), (1250, 938),
                                                         (313, 235)]
    # each level is the 2x halving (rounded up) of the 2x halving
    assert pyramid_sizes(1001, 703, min_level_size=100, level_step=4) == [(1001, 703), (251, 176), (63, 44)]
    assert pyramid_sizes(1001, 703, 100, level_step=2)[::2] == pyramid_sizes(1001, 703, 100, level_step=4)


def test_aperio_layout_opens_in_openslide_and_tifffile(tmp_path):
    """Level 0, a stripped thumbnail, tiled levels at downsample 4, 16, 64, a label and a macro: what an
    Aperio scanner writes. Lossless, so every stored level is exactly the 2x-of-2x reduction of level 0."""
    h, w = 1291, 2111  # odd: cut edges at every level
    img = np.random.default_rng(3).integers(0, 256, (h, w, 3), dtype=np.uint8)
    label = np.random.default_rng(4).integers(0, 256, (422, 415, 3), dtype=np.uint8)
    seen = []

    def macro(overview):
        seen.append(overview.copy())
        return np.pad(overview, ((7, 7), (9, 9), (0, 0)), constant_values=200)

    path = tmp_path / "scanner.svs"
    calls = []
    levels = write_pyramid(path, w, h, tile_reader(img, calls), tile=128, compression="deflate", mpp=0.2527,
                           aperio=True, app_mag=40, min_level_size=40, level_step=4, thumbnail=True,
                           label=label, macro=macro, description="Title = test")
    assert len(calls) == len(set(calls)) == 17 * 11  # level 0 read once, the thumbnail comes from the cascade
    ladder = [img]  # the 2x cascade computed with NumPy
    while max(ladder[-1].shape[:2]) > 20:
        ladder.append(reference_reduce(ladder[-1], "mean"))
    expected = [ladder[0], ladder[2], ladder[4], ladder[6]]  # 2111, 528, 132, 33 wide
    thumb = ladder[2]  # 2111 -> 1056 -> 528: the largest 2x level with a long side <= 1024
    assert [(lv.width, lv.height) for lv in levels] == [(e.shape[1], e.shape[0]) for e in expected]
    assert len(seen) == 1 and np.array_equal(seen[0], thumb)

    slide = openslide.OpenSlide(path)
    assert slide.properties["openslide.vendor"] == "aperio"
    assert slide.level_dimensions == tuple((e.shape[1], e.shape[0]) for e in expected)
    for got, want in zip(slide.level_downsamples, [1, 4, 16, 64]):
        assert got == pytest.approx(want, rel=0.03)
    assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(0.2527)
    assert slide.properties["openslide.objective-power"] == "40"
    assert slide.properties["aperio.Title"] == "test"
    assoc = slide.associated_images
    assert sorted(assoc) == ["label", "macro", "thumbnail"]
    assert assoc["thumbnail"].size == (528, 323) and assoc["label"].size == (415, 422)
    assert assoc["macro"].size == (528 + 18, 323 + 14)
    assert np.array_equal(np.asarray(assoc["label"])[..., :3], label)
    assert np.array_equal(np.asarray(assoc["thumbnail"])[..., :3], thumb)
    for k, e in enumerate(expected):
        got = np.asarray(slide.read_region((0, 0), k, slide.level_dimensions[k]))[..., :3]
        assert np.array_equal(got, e), f"level {k}"

    with tifffile.TiffFile(path) as tif:
        assert tif.is_svs
        series = {s.name: s for s in tif.series}
        assert list(series) == ["Baseline", "Thumbnail", "Label", "Macro"]
        base = tif.series[0]
        assert [lv.shape[-3:] for lv in base.levels] == [e.shape for e in expected]
        for lv, e in zip(base.levels, expected):
            assert np.array_equal(lv.asarray().reshape(e.shape), e)
        assert np.array_equal(series["Thumbnail"].asarray(), thumb)
        assert np.array_equal(series["Label"].asarray(), label)
        assert series["Macro"].shape == (337, 546, 3)
        pages = tif.pages
        assert [p.is_tiled for p in pages] == [True, False, True, True, True, False, False]
        assert [p.subfiletype for p in pages] == [0, 0, 0, 0, 0, 1, 9]
        assert pages[1].description == ("Aperio Image Library v12.0.15\r\n2111x1291 -> 528x323 - "
                                        "|AppMag = 40|MPP = 0.2527|Title = test")
        assert pages[2].description.startswith(
            "Aperio Image Library v12.0.15\r\n2111x1291 [0,0 2111x1291] (128x128) -> 528x323 DEFLATE|AppMag")
        assert pages[5].description == "Aperio Image Library v12.0.15\r\nlabel 415x422"
        assert pages[6].description == "Aperio Image Library v12.0.15\r\nmacro 546x337"
        assert pages[5].compression == tifffile.COMPRESSION.LZW
        assert pages[6].compression == tifffile.COMPRESSION.JPEG


def test_aperio_jpeg_thumbnail_and_small_slide(tmp_path):
    """JPEG throughout (as scanners write it), on a slide whose level 0 is already thumbnail-sized."""
    img = smooth_rgb(300, 500)
    path = tmp_path / "small.svs"
    write_pyramid(path, 500, 300, tile_reader(img), tile=128, mpp=0.25, aperio=True, app_mag=40,
                  min_level_size=128, level_step=4, thumbnail=True)
    slide = openslide.OpenSlide(path)
    assert slide.level_dimensions == ((500, 300), (125, 75))
    assert sorted(slide.associated_images) == ["thumbnail"]
    thumb = np.asarray(slide.associated_images["thumbnail"])[..., :3].astype(np.int16)
    assert thumb.shape == img.shape and np.abs(thumb - img).mean() < 1.5  # level 0 itself, JPEG q90
    level1 = np.asarray(slide.read_region((0, 0), 1, (125, 75)))[..., :3].astype(np.int16)
    assert np.abs(level1 - reference_reduce(reference_reduce(img, "mean"), "mean")).mean() < 2.0


@pytest.mark.parametrize("kwargs, message", [
    (dict(level_step=3), "level_step=3"),
    (dict(level_step=1), "level_step=1"),
    (dict(thumbnail=True), "aperio=True"),
    (dict(label=np.zeros((8, 8, 3), np.uint8)), "aperio=True"),
    (dict(aperio=True, thumbnail=4), "thumbnail=4"),
    (dict(aperio=True, label=np.zeros((8, 8, 4), np.uint8)), r"label image uint8 \(8, 8, 4\)"),
    (dict(aperio=True, macro=lambda small: small.astype(float)), r"macro image float64"),
])
def test_bad_aperio_pages_raise_config_error(tmp_path, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        write_pyramid(tmp_path / "x.svs", 64, 64, lambda x, y, w, h: np.zeros((h, w, 3), np.uint8), **kwargs)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("compression", ["jpeg", "deflate"])
def test_same_bytes_with_any_pool_and_pushed_or_pulled(tmp_path, compression):
    """The pool only changes which thread encodes a tile: 1 or 3 threads, tiles pulled from a callback or
    rows pushed into a `PyramidWriter`, the file is the same byte for byte (Aperio layout, all page kinds)."""
    h, w = 1291, 1111
    img = smooth_rgb(h, w, seed=5) if compression == "jpeg" else \
        np.random.default_rng(6).integers(0, 256, (h, w, 3), dtype=np.uint8)
    kwargs = dict(tile=128, compression=compression, mpp=0.25, aperio=True, app_mag=40, min_level_size=40,
                  level_step=4, thumbnail=True, macro=lambda small: small[::2, ::2].copy())
    files = []
    for pool in (1, 3):
        path = tmp_path / f"pulled{pool}.svs"
        write_pyramid(path, w, h, tile_reader(img), pool=pool, **kwargs)
        files.append(path.read_bytes())
    writer = pyramid_tiff.PyramidWriter(tmp_path / "pushed.svs", w, h, channels=3, pool=2, queue_bands=2,
                                        **kwargs)
    for y in range(0, h, 300):
        writer.write_rows(y, img[y:y + 300])
    assert writer.close() == tmp_path / "pushed.svs"
    assert [lv.width for lv in writer.levels] == [1111, 278, 70, 18]
    files.append((tmp_path / "pushed.svs").read_bytes())
    assert files[0] == files[1] == files[2]
    if compression == "deflate":
        with tifffile.TiffFile(tmp_path / "pushed.svs") as tif:
            np.testing.assert_array_equal(tif.series[0].levels[0].asarray(), img)


def test_pool_argument_is_checked(tmp_path):
    with pytest.raises(ConfigError, match="pool=0"):
        write_pyramid(tmp_path / "x.tif", 64, 64, lambda x, y, w, h: np.zeros((h, w, 3), np.uint8), pool=0)
    with pytest.raises(ConfigError, match="compression_level=3 is for deflate"):
        write_pyramid(tmp_path / "x.tif", 64, 64, lambda x, y, w, h: np.zeros((h, w, 3), np.uint8),
                      compression_level=3)
    assert os.listdir(tmp_path) == []


def test_uniform_row_hints_give_the_same_file(tmp_path):
    """`write_rows(..., value=v)` (rows the caller knows to be all v: glass, tumour-free mask rows) only saves
    the writer its look at each tile: the file is the same byte for byte as without hints, whole bands pushed
    as views or pieces copied into a band, and a band whose pieces disagree is looked at as usual."""
    h, w, tile = 700, 530, 128
    img = np.zeros((h, w), np.uint8)
    img[300:420, 40:300] = np.random.default_rng(2).integers(0, 256, (120, 260))
    img[520:] = 9
    uniform = {y: int(img[y, 0]) for y in range(h) if (img[y] == img[y, 0]).all()}

    def push(path, hints, copy, step):
        wr = pyramid_tiff.PyramidBandWriter(path, w, h, tile=tile, mpp=0.5, min_level_size=64)
        for y in range(0, h, step):
            rows = img[y:y + step]
            value = uniform.get(y) if hints and all(uniform.get(r) == uniform.get(y) for r in
                                                    range(y, y + len(rows))) else None
            wr.write_rows(y, rows.copy(), copy=copy, value=value)
        return wr.close().read_bytes()

    plain = push(tmp_path / "plain.tif", False, False, tile)
    assert push(tmp_path / "views.tif", True, False, tile) == plain
    assert push(tmp_path / "pieces.tif", True, True, 50) == plain
    with tifffile.TiffFile(tmp_path / "plain.tif") as tif:
        np.testing.assert_array_equal(tif.series[0].levels[0].asarray(), img)
    wr = pyramid_tiff.PyramidBandWriter(tmp_path / "bad.tif", w, h, tile=tile)
    with pytest.raises(ConfigError, match="value=256"):
        wr.write_rows(0, img[:10], value=256)
    wr.abort()
