"""Output writers: streamed pyramidal TIFF read back by OpenSlide, block means, the overlay, atomic files."""
import io
import json
import threading

import numpy as np
import openslide
import pytest
import tifffile
from scipy import ndimage
from slide_fixtures import reference_reduce
from test_polygons import random_mask

from fastgicn.errors import ConfigError, SlideError
from fastgicn.outputs.atomic import atomic_path, remove_partials, write_json
from fastgicn.outputs.lowres import LowRes, lowres_factor
from fastgicn.outputs.overlay import overlay_image, write_overlay_png
from fastgicn.outputs.tiff import MAP_DEFLATE_LEVEL, PyramidBandWriter


def test_lowres_block_means_match_numpy():
    rng = np.random.default_rng(0)
    h, w, f = 103, 77, 8
    img = rng.integers(0, 256, (h, w), dtype=np.uint8)
    lr = LowRes(w, h, f)
    y = 0
    while y < h:
        n = int(rng.integers(1, 30))
        lr.add(y, img[y:y + n])
        y += min(n, h - y)
    ref = np.zeros((lr.out_h, lr.out_w))
    for by in range(lr.out_h):
        for bx in range(lr.out_w):
            ref[by, bx] = img[by * f:(by + 1) * f, bx * f:(bx + 1) * f].mean()
    np.testing.assert_array_equal(lr.result(), np.rint(ref).astype(np.uint8))
    assert lr.count == int((img >= 128).sum())
    with pytest.raises(ConfigError, match="in order"):
        lr.add(5, img[:1])
    assert lowres_factor(5000, 3000, 2048) == 4 and lowres_factor(100, 100, 2048) == 1
    # rows the caller has seen to be zeros (blank=True) count as zeros without a look
    img[20:60] = 0
    hinted = LowRes(w, h, f)
    for y in range(0, h, 10):
        rows = img[y:y + 10]
        hinted.add(y, rows, blank=not rows.any())
    ref = np.array([[img[by * f:(by + 1) * f, bx * f:(bx + 1) * f].mean() for bx in range(lr.out_w)]
                    for by in range(lr.out_h)])
    np.testing.assert_array_equal(hinted.result(), np.rint(ref).astype(np.uint8))
    assert hinted.count == int((img >= 128).sum())


@pytest.mark.parametrize("mode", ["mean", "majority"])
def test_band_writer_tiff_opens_in_openslide_with_mpp_and_values(tmp_path, mode):
    h, w = 700, 1100
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (h, w), dtype=np.uint8)
    if mode == "majority":
        img = np.where(random_mask(h, w, 2), 255, 0).astype(np.uint8)
    path = tmp_path / "p.tif"
    wr = PyramidBandWriter(path, w, h, mpp=0.5, tile=128, downsample=mode, queue_bands=1)
    y = 0
    while y < h:
        n = min(int(rng.integers(1, 300)), h - y)
        wr.write_rows(y, img[y:y + n])
        y += n
    assert wr.close() == path
    assert [p.name for p in tmp_path.iterdir()] == ["p.tif"]  # no temporary left
    s = openslide.OpenSlide(str(path))
    try:
        assert s.dimensions == (w, h)
        assert s.level_count >= 2 and s.level_dimensions[1] == ((w + 1) // 2, (h + 1) // 2)
        assert float(s.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(0.5)
        back = np.asarray(s.read_region((0, 0), 0, (w, h)))[..., 0]
        np.testing.assert_array_equal(back, img)
        if mode == "majority":
            low = np.asarray(s.read_region((0, 0), 1, s.level_dimensions[1]))[..., 0]
            assert set(np.unique(low)) <= {0, 255}
    finally:
        s.close()


def test_band_writer_abort_and_errors_leave_nothing(tmp_path):
    path = tmp_path / "p.tif"
    wr = PyramidBandWriter(path, 300, 300, tile=64)
    wr.write_rows(0, np.zeros((100, 300), np.uint8))
    with pytest.raises(ConfigError, match="in order"):
        wr.write_rows(50, np.zeros((10, 300), np.uint8))
    wr.abort()
    assert list(tmp_path.iterdir()) == []
    wr = PyramidBandWriter(path, 300, 300, tile=64)
    wr.write_rows(0, np.zeros((100, 300), np.uint8))
    with pytest.raises(ConfigError, match="100 of 300 rows"):
        wr.close()
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(SlideError, match="does not exist"):  # at once, before any row is computed
        PyramidBandWriter(tmp_path / "missing" / "p.tif", 300, 300, tile=64)
    with pytest.raises(ConfigError, match="compression_level=12"):
        PyramidBandWriter(path, 300, 300, tile=64, compression_level=12)
    assert list(tmp_path.iterdir()) == []


def probability_map(h, w, seed=0):
    """Like a network's output: smooth regions of high and low probability, pixel noise, and glass (0)."""
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.random((h, w)), 12)
    field = (field - field.min()) / (np.ptp(field) + 1e-9)
    prob = 255 / (1 + np.exp(-12 * (field - 0.5))) + rng.normal(0, 6, (h, w))
    prob[:, : w // 5] = 0  # glass: uniform tiles
    return np.clip(np.rint(prob), 0, 255).astype(np.uint8)


def push(writer, img, seed=0):
    """Rows in uneven chunks, from a buffer the caller overwrites after each call (the writer copies)."""
    rng = np.random.default_rng(seed)
    buf = np.empty_like(img)
    y = 0
    while y < len(img):
        n = min(int(rng.integers(1, 200)), len(img) - y)
        buf[:n] = img[y:y + n]
        writer.write_rows(y, buf[:n])
        buf[:n] = 77
        y += n
    return writer.close()


def writer_threads():
    return [t.name for t in threading.enumerate() if t.name.startswith(("fastgicn-write", "fastgicn-encode"))]


@pytest.mark.parametrize("mode", ["mean", "majority"])
def test_band_writer_is_exact_at_every_level_and_the_same_bytes_with_any_pool(tmp_path, mode):
    h, w = 901, 1237  # odd: cut tiles and cut 2x2 blocks at every level
    img = probability_map(h, w, 3)
    if mode == "majority":
        img = np.where(img >= 128, 255, 0).astype(np.uint8)
    files = {}
    for pool in (1, 3, None):
        path = tmp_path / f"{pool}" / "p.tif"
        path.parent.mkdir()
        wr = PyramidBandWriter(path, w, h, mpp=0.5, tile=128, downsample=mode, pool=pool, queue_bands=2,
                               min_level_size=160)
        assert push(wr, img, seed=pool or 0) == path
        assert wr.tiles == 8 * 10 and wr.seconds > 0
        assert [p.name for p in path.parent.iterdir()] == ["p.tif"]
        files[pool] = path.read_bytes()
        ideal = img
        slide = openslide.OpenSlide(str(path))
        try:
            assert slide.level_dimensions == ((1237, 901), (619, 451), (310, 226), (155, 113))
            assert [(lv.width, lv.height) for lv in wr.levels] == list(slide.level_dimensions)
            with tifffile.TiffFile(path) as tif:
                assert len(tif.pages) == slide.level_count
                for k, page in enumerate(tif.pages):
                    assert page.compression in (tifffile.COMPRESSION.DEFLATE, tifffile.COMPRESSION.ADOBE_DEFLATE)
                    np.testing.assert_array_equal(page.asarray(), ideal, err_msg=f"tifffile level {k}")
                    back = np.asarray(slide.read_region((0, 0), k, slide.level_dimensions[k]))
                    np.testing.assert_array_equal(back[..., 0], ideal, err_msg=f"openslide level {k}")
                    ideal = reference_reduce(ideal, mode)
        finally:
            slide.close()
    assert files[1] == files[3] == files[None]  # deterministic: the pool only changes who encodes
    assert writer_threads() == []


def test_band_writer_deflate_level_is_an_argument_and_lossless(tmp_path):
    img = probability_map(300, 420, 5)
    sizes = {}
    for level in sorted({1, 9, MAP_DEFLATE_LEVEL}):
        path = tmp_path / f"l{level}.tif"
        push(PyramidBandWriter(path, 420, 300, tile=64, compression_level=level, pool=2, min_level_size=100),
             img)
        for k in range(3):
            np.testing.assert_array_equal(tifffile.imread(path, key=k), img if k == 0 else
                                          tifffile.imread(tmp_path / "l1.tif", key=k))
        sizes[level] = path.stat().st_size
    assert sizes[9] < sizes[1]
    path = tmp_path / "default.tif"
    push(PyramidBandWriter(path, 420, 300, tile=64, pool=2, min_level_size=100), img)
    assert path.read_bytes() == (tmp_path / f"l{MAP_DEFLATE_LEVEL}.tif").read_bytes()


def test_the_two_maps_share_one_encoding_pool_that_ends_with_them(tmp_path):
    a = PyramidBandWriter(tmp_path / "a.tif", 200, 100, tile=64)
    b = PyramidBandWriter(tmp_path / "b.tif", 200, 100, tile=64)
    assert a._executor is b._executor
    push(a, probability_map(100, 200))
    assert any(t.startswith("fastgicn-encode") for t in writer_threads())  # b still holds the pool
    push(b, np.zeros((100, 200), np.uint8))
    assert writer_threads() == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tif", "b.tif"]


@pytest.mark.parametrize("pool", [1, 4, None])
def test_band_writer_abort_mid_stream_leaves_no_thread_and_no_file(tmp_path, pool):
    h, w = 2000, 1500
    img = probability_map(h, w, 1)
    wr = PyramidBandWriter(tmp_path / "p.tif", w, h, tile=128, pool=pool, queue_bands=2)
    for y in range(0, 1000, 100):
        wr.write_rows(y, img[y:y + 100])
    wr.abort()
    assert writer_threads() == []
    assert list(tmp_path.iterdir()) == []
    wr.abort()  # twice is harmless
    with pytest.raises(ConfigError, match="after close"):
        wr.write_rows(1000, img[1000:1100])


@pytest.mark.parametrize("pool", [1, 3])
def test_band_writer_disk_full_raises_slide_error_and_leaves_nothing(tmp_path, monkeypatch, pool):
    from test_pyramid_tiff import _DiskFullAfter

    from fastgicn.outputs import tiff as pyramid_tiff

    monkeypatch.setattr(pyramid_tiff, "_open_output",
                        lambda p: io.BufferedWriter(_DiskFullAfter(p, 50_000), buffer_size=4096))
    path = tmp_path / "prob.tif"
    path.write_bytes(b"previous complete file")
    img = probability_map(700, 900, 2)
    wr = PyramidBandWriter(path, 900, 700, tile=128, pool=pool)
    with pytest.raises(SlideError, match=r"disk full while writing .*prob\.tif"):
        push(wr, img)  # from write_rows or close, whichever comes after the writer fails
    wr.abort()
    assert path.read_bytes() == b"previous complete file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prob.tif"]
    assert writer_threads() == []


def test_atomic_files(tmp_path):
    path = write_json(tmp_path / "r.json", {"a": np.int64(3), "b": np.float32(0.5), "c": tmp_path})
    assert json.loads(path.read_text()) == {"a": 3, "b": 0.5, "c": str(tmp_path)}
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "x.bin") as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("killed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]
    (tmp_path / ".s.tif.abcd.partial").write_bytes(b"")
    (tmp_path / ".s.tif.abcd.spool").write_bytes(b"")
    assert len(remove_partials(tmp_path, "s.tif")) == 2
    with pytest.raises(SlideError, match="does not exist"):
        write_json(tmp_path / "nope" / "r.json", {})


def test_overlay_tints_tumour_and_keeps_the_rest():
    thumb = np.full((20, 30, 3), 240, np.uint8)
    mask = np.zeros((20, 30), bool)
    mask[5:15, 5:20] = True
    out = overlay_image(thumb, mask)
    assert (out[~mask] == 240).all()
    # the outline (mask pixels with a 4-neighbour outside it) solid red, the inside 45 % red over the thumbnail
    padded = np.pad(mask, 1)
    inside = mask & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    assert (out[mask & ~inside] == (200, 0, 0)).all()
    blend = np.rint(240 * 0.55 + np.array([200, 0, 0]) * 0.45)
    assert inside.sum() == 8 * 13 and (np.abs(out[inside].astype(int) - blend) <= 1).all()
    with pytest.raises(ConfigError):
        overlay_image(thumb, mask[:10])


def test_overlay_png_holds_exactly_the_overlay_pixels(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(3)
    thumb = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    mask = rng.random((37, 53)) < 0.3
    path = write_overlay_png(tmp_path / "o.png", thumb, mask)
    with Image.open(path) as img:  # an independent decoder
        assert img.format == "PNG" and img.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(img), overlay_image(thumb, mask))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.png"]  # no temporary left


@pytest.mark.parametrize("seed", range(3))
def test_overlay_matches_a_numpy_reference_on_random_masks(seed):
    """Tint (integer 45 % of the colour over the thumbnail) where the mask is, solid colour on its outline
    (mask pixels with a 4-neighbour outside it, scipy's erosion), the thumbnail elsewhere."""
    rng = np.random.default_rng(seed)
    h, w = (int(v) for v in rng.integers(1, 600, 2))
    thumb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    mask = ndimage.gaussian_filter(rng.random((h, w)), 1.5) > 0.5
    a = round(0.45 * 256)
    want = thumb.copy()
    tint = (thumb.astype(np.uint32) * (256 - a) + np.array([200, 0, 0]) * a + 128) >> 8
    want[mask] = tint[mask]
    want[mask & ~ndimage.binary_erosion(mask, border_value=0)] = (200, 0, 0)
    np.testing.assert_array_equal(overlay_image(thumb, mask), want)
