"""Synthetic slides: exact crop consistency, determinism, XS/XL tumours, and files OpenSlide reads back."""
from __future__ import annotations

import os

import numpy as np
import openslide
import pytest
from scipy import ndimage

import tifffile

from fastgicn import cli, synth
from fastgicn.errors import ConfigError, SlideError
from fastgicn.synth import (LABEL_SIZE, XS_AREA_LIMIT, SyntheticSlide, mask_path_for, synthetic_label,
                            write_synthetic_slide)

W, H, SEED = 2048, 1536, 7


@pytest.fixture(scope="module")
def slide() -> SyntheticSlide:
    return SyntheticSlide(W, H, seed=SEED)


@pytest.fixture(scope="module")
def whole(slide):
    """The whole slide rendered in one call (internally in 512-pixel chunks)."""
    return slide.render(0, 0, W, H)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """The same slide written as SVS and as generic TIFF (a level at every power of two), with its mask."""
    out = tmp_path_factory.mktemp("synth")
    return {fmt: write_synthetic_slide(out / f"slide.{fmt}", W, H, seed=SEED, layout="pow2")
            for fmt in ("svs", "tif")}


@pytest.fixture(scope="module")
def written_aperio(tmp_path_factory):
    """The same slide in the Aperio scanner layout: levels 1, 4, 16 (long side down to <= 200 px)."""
    out = tmp_path_factory.mktemp("synth_aperio")
    return write_synthetic_slide(out / "scanner.svs", W, H, seed=SEED, layout="aperio", min_level_size=200)


def block_mean(img: np.ndarray, d: int) -> np.ndarray:
    """NumPy reference: rounded (half up) mean of d x d blocks."""
    h, w = img.shape[0] // d, img.shape[1] // d
    blocks = img[:h * d, :w * d].astype(np.float64).reshape(h, d, w, d, *img.shape[2:])
    return np.floor(blocks.mean(axis=(1, 3)) + 0.5).astype(np.uint8)


def test_any_tiling_reassembles_the_whole_render_exactly(slide, whole):
    rgb, mask = whole
    # an odd tile grid at an odd offset, stitched back together
    tiled_rgb = np.zeros_like(rgb)
    tiled_mask = np.zeros_like(mask)
    for y in range(-37, H, 301):
        for x in range(-53, W, 333):
            r, m = slide.render(x, y, 333, 301)
            y0, x0 = max(y, 0), max(x, 0)
            y1, x1 = min(y + 301, H), min(x + 333, W)
            tiled_rgb[y0:y1, x0:x1] = r[y0 - y:y1 - y, x0 - x:x1 - x]
            tiled_mask[y0:y1, x0:x1] = m[y0 - y:y1 - y, x0 - x:x1 - x]
    assert np.array_equal(tiled_rgb, rgb)
    assert np.array_equal(tiled_mask, mask)


def test_random_regions_equal_crops_of_the_whole(slide, whole):
    rgb, mask = whole
    rng = np.random.default_rng(0)
    for _ in range(25):
        x, y = int(rng.integers(0, W - 1)), int(rng.integers(0, H - 1))
        w, h = int(rng.integers(1, min(260, W - x) + 1)), int(rng.integers(1, min(260, H - y) + 1))
        r, m = slide.render(x, y, w, h)
        assert np.array_equal(r, rgb[y:y + h, x:x + w]), (x, y, w, h)
        assert np.array_equal(m, mask[y:y + h, x:x + w]), (x, y, w, h)


def test_render_mask_is_the_render_mask(slide, whole):
    assert np.array_equal(slide.render_mask(0, 0, W, H), whole[1])
    assert np.array_equal(slide.render_mask(1000, 700, 123, 77), whole[1][700:777, 1000:1123])


def test_outside_the_slide_is_white_and_not_tumour(slide, whole):
    r, m = slide.render(W - 100, H - 50, 300, 200)
    assert np.array_equal(r[:50, :100], whole[0][H - 50:, W - 100:])
    assert (r[50:] == 255).all() and (r[:, 100:] == 255).all()
    assert (m[50:] == 0).all() and (m[:, 100:] == 0).all()
    r, m = slide.render(-500, -500, 100, 100)
    assert (r == 255).all() and (m == 0).all()


@pytest.mark.parametrize("d", [2, 3])
def test_downsampled_render_is_the_area_average(slide, whole, d):
    rgb, mask = whole
    x, y, w, h = 600, 300, 200, 150
    r, m = slide.render(x, y, w, h, downsample=d)
    full = rgb[y:y + h * d, x:x + w * d]
    assert np.array_equal(r, block_mean(full, d))
    fraction = (mask[y:y + h * d, x:x + w * d] > 0).reshape(h, d, w, d).mean(axis=(1, 3))
    assert np.array_equal(m > 0, fraction >= 0.5) and set(np.unique(m)) <= {0, 255}
    assert 0 < fraction.mean() < 1  # the region holds tumour edges, so the rule is exercised


def test_deterministic_by_seed():
    a = SyntheticSlide(W, H, seed=11).render(700, 500, 256, 256)
    b = SyntheticSlide(W, H, seed=11).render(700, 500, 256, 256)
    c = SyntheticSlide(W, H, seed=12).render(700, 500, 256, 256)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])
    full_a = SyntheticSlide(W, H, seed=11).render(0, 0, W // 8, H // 8, downsample=8)[0]
    full_c = SyntheticSlide(W, H, seed=12).render(0, 0, W // 8, H // 8, downsample=8)[0]
    assert np.abs(full_a.astype(int) - full_c).mean() > 5  # a different layout, not just different noise


def test_small_and_large_tumours_inside_tissue(whole):
    rgb, mask = whole
    assert set(np.unique(mask)) == {0, 255}
    labels, n = ndimage.label(mask > 0)
    sizes = np.bincount(labels.ravel())[1:]
    assert (sizes < XS_AREA_LIMIT).sum() >= 2, sizes  # XS, the paper's small metastases
    assert (sizes >= XS_AREA_LIMIT).sum() >= 1, sizes  # XL
    # tumour is tissue: no tumour pixel is white glass by the paper's background rule (all channels > 220)
    assert not (rgb[mask > 0] > 220).all(axis=1).any()
    # and glass exists around the tissue
    assert (rgb > 220).all(axis=2).mean() > 0.2


def _patches(rgb, mask, size, want_tumour, tissue, n, rng):
    out = []
    for _ in range(20000):
        y, x = int(rng.integers(0, rgb.shape[0] - size)), int(rng.integers(0, rgb.shape[1] - size))
        m = mask[y:y + size, x:x + size]
        t = tissue[y:y + size, x:x + size]
        if (want_tumour and m.all()) or (not want_tumour and not m.any() and t.all()):
            out.append(rgb[y:y + size, x:x + size])
            if len(out) == n:
                break
    return out


@pytest.mark.parametrize("d", [1, 2])
def test_tumour_texture_differs_from_normal_tissue(slide, whole, d):
    """What a small CNN must learn: tumour patches (64 x 64) have more, larger, darker nuclei than normal
    tissue patches, at downsample 1 and 2. A one-number feature (the fraction of dark hematoxylin pixels)
    already separates them."""
    if d == 1:
        rgb, mask = whole
    else:
        rgb, mask = slide.render(0, 0, W // 2, H // 2, downsample=2)
    tissue = ~(rgb > 220).all(axis=2)
    rng = np.random.default_rng(d)
    tumour = _patches(rgb, mask, 64, True, tissue, 60, rng)
    normal = _patches(rgb, mask, 64, False, tissue, 60, rng)
    assert len(tumour) >= 30 and len(normal) >= 30

    def dark_fraction(p):
        return float((p[..., 0] < 150).mean())

    t = np.array([dark_fraction(p) for p in tumour])
    n = np.array([dark_fraction(p) for p in normal])
    threshold = (np.median(t) + np.median(n)) / 2
    accuracy = ((t > threshold).sum() + (n <= threshold).sum()) / (len(t) + len(n))
    assert accuracy >= 0.95, (np.median(t), np.median(n))
    assert np.median([p.mean() for p in tumour]) < np.median([p.mean() for p in normal])  # darker


@pytest.mark.parametrize("fmt", ["svs", "tif"])
def test_written_slide_opens_in_openslide_and_matches_render(written, whole, fmt):
    slide_path, mask_path = written[fmt]
    assert slide_path.name == f"slide.{fmt}" and mask_path.name == "slide.mask.tif"
    rgb, mask = whole
    s = openslide.OpenSlide(slide_path)
    assert s.properties["openslide.vendor"] == ("aperio" if fmt == "svs" else "generic-tiff")
    assert s.level_count == 2 and s.level_dimensions == ((W, H), (W // 2, H // 2))
    assert s.level_downsamples == pytest.approx((1.0, 2.0))
    assert float(s.properties["openslide.mpp-x"]) == pytest.approx(0.25)
    if fmt == "svs":
        assert float(s.properties["aperio.AppMag"]) == 40
        assert float(s.properties["aperio.MPP"]) == pytest.approx(0.25)
    level0 = np.asarray(s.read_region((0, 0), 0, (W, H)))[..., :3].astype(np.int16)
    assert np.abs(level0 - rgb).mean() < 3.0  # JPEG q90
    level1 = np.asarray(s.read_region((0, 0), 1, (W // 2, H // 2)))[..., :3].astype(np.int16)
    assert np.abs(level1 - block_mean(rgb, 2)).mean() < 3.0

    m = openslide.OpenSlide(mask_path)
    assert m.level_dimensions == s.level_dimensions
    assert float(m.properties["openslide.mpp-x"]) == pytest.approx(0.25)
    got = np.asarray(m.read_region((0, 0), 0, (W, H)))
    assert np.array_equal(got[..., 0], mask)
    got1 = np.asarray(m.read_region((0, 0), 1, (W // 2, H // 2)))[..., 0]
    fraction = (mask > 0).reshape(H // 2, 2, W // 2, 2).mean(axis=(1, 3))
    assert np.array_equal(got1 > 0, fraction >= 0.5) and set(np.unique(got1)) <= {0, 255}


def test_mask_path_is_beside_the_slide(tmp_path):
    assert mask_path_for(tmp_path / "OUT.svs") == tmp_path / "OUT.mask.tif"
    assert mask_path_for("a/b.tiff") == mask_path_for("a/b.tif")


@pytest.mark.parametrize("args, kwargs, error, message", [
    (("out.png", 64, 64), {}, ConfigError, r"unknown suffix '\.png'.*\.svs"),
    (("out.svs", 0, 64), {}, ConfigError, "width=0"),
    (("out.svs", 64, -3), {}, ConfigError, "height=-3"),
    (("out.svs", 10, 10), {}, ConfigError, "at least 64"),
    (("out.svs", 64, 64), {"fmt": "jpeg"}, ConfigError, "fmt='jpeg'"),
    (("out.svs", 64, 64), {"seed": -1}, ConfigError, "seed=-1"),
    (("out.svs", 64, 64), {"mpp": 0}, ConfigError, "mpp=0"),
    (("out.tif", 64, 64), {"layout": "aperio"}, ConfigError, r"out\.tif: layout 'aperio'.*file \.svs"),
    (("out.svs", 64, 64), {"layout": "aperio", "fmt": "tiff"}, ConfigError, "needs fmt 'aperio'"),
    (("out.svs", 64, 64), {"layout": "pyramid"}, ConfigError, "layout='pyramid'"),
    (("missing/out.svs", 64, 64), {}, SlideError, "does not exist"),
])
def test_bad_arguments_name_the_value(tmp_path, args, kwargs, error, message):
    with pytest.raises(error, match=message):
        write_synthetic_slide(tmp_path / args[0], *args[1:], **kwargs)
    assert os.listdir(tmp_path) == []


def test_a_failed_slide_leaves_neither_file(tmp_path, monkeypatch):
    calls = {"n": 0}
    real_render = SyntheticSlide.render

    def failing_render(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("simulated crash")
        return real_render(self, *args, **kwargs)

    monkeypatch.setattr(SyntheticSlide, "render", failing_render)
    with pytest.raises(RuntimeError, match="simulated crash"):
        write_synthetic_slide(tmp_path / "s.svs", 1024, 768, seed=1)
    assert os.listdir(tmp_path) == []


def test_aperio_layout_reads_like_a_scanner_svs_in_openslide_and_tifffile(written_aperio, whole):
    slide_path, mask_path = written_aperio
    rgb, mask = whole
    dims = ((W, H), (W // 4, H // 4), (W // 16, H // 16))
    s = openslide.OpenSlide(slide_path)
    assert s.properties["openslide.vendor"] == "aperio"
    assert s.level_dimensions == dims
    assert s.level_downsamples == pytest.approx((1.0, 4.0, 16.0))
    assert float(s.properties["openslide.mpp-x"]) == pytest.approx(0.25)
    assert s.properties["openslide.objective-power"] == "40"
    assoc = s.associated_images
    assert sorted(assoc) == ["label", "macro", "thumbnail"]
    assert assoc["thumbnail"].size == (W // 2, H // 2)  # the largest 2x level with a long side <= 1024
    assert assoc["label"].size == LABEL_SIZE
    assert np.array_equal(np.asarray(assoc["label"])[..., :3], synthetic_label(SEED))  # LZW: exact
    macro = np.asarray(assoc["macro"])[..., :3]
    assert macro.shape[0] > H // 2 and macro.shape[1] > W // 2 + LABEL_SIZE[0] // 2

    # each stored level against the exact 2x-of-2x reduction of the render (JPEG q90 error only)
    ideal = rgb
    for k, (w, h) in enumerate(dims):
        got = np.asarray(s.read_region((0, 0), k, (w, h)))[..., :3].astype(np.int16)
        assert np.abs(got - ideal).mean() < 3.0, k
        ideal = block_mean(block_mean(ideal, 2), 2)
    thumb = np.asarray(assoc["thumbnail"])[..., :3].astype(np.int16)
    assert np.abs(thumb - block_mean(rgb, 2)).mean() < 3.0

    with tifffile.TiffFile(slide_path) as tif:
        assert tif.is_svs
        assert [x.name for x in tif.series] == ["Baseline", "Thumbnail", "Label", "Macro"]
        levels = tif.series[0].levels
        assert [lv.shape[-3:] for lv in levels] == [(h, w, 3) for w, h in dims]
        level1 = levels[1].asarray().reshape(H // 4, W // 4, 3).astype(np.int16)
        assert np.abs(level1 - block_mean(block_mean(rgb, 2), 2)).mean() < 3.0
        assert tif.series[1].shape == (H // 2, W // 2, 3)
        assert tif.series[2].shape == (LABEL_SIZE[1], LABEL_SIZE[0], 3)
        thumb_head = f"Aperio Image Library v12.0.15\r\n{W}x{H} -> {W // 2}x{H // 2} - |"
        assert tif.pages[1].description.startswith(thumb_head)

    # the ground truth keeps a lossless level at every power of two, whatever the slide's layout
    m = openslide.OpenSlide(mask_path)
    assert m.level_dimensions == tuple((W // d, H // d) for d in (1, 2, 4, 8, 16))
    assert np.array_equal(np.asarray(m.read_region((0, 0), 0, (W, H)))[..., 0], mask)


def test_synthetic_label_holds_the_seed():
    a, b = synthetic_label(7), synthetic_label(8)
    assert a.shape == (LABEL_SIZE[1], LABEL_SIZE[0], 3) and a.dtype == np.uint8
    assert np.array_equal(a, synthetic_label(7)) and not np.array_equal(a, b)
    dark = (a < 100).all(axis=2).mean()
    assert 0.05 < dark < 0.5  # mostly white paper, with a dark text and barcode pattern


@pytest.mark.parametrize("default", ["pow2", "aperio"])
def test_layout_none_follows_the_module_default_for_svs_and_is_pow2_for_tif(tmp_path, monkeypatch, default):
    monkeypatch.setattr(synth, "DEFAULT_SVS_LAYOUT", default)
    svs, _ = write_synthetic_slide(tmp_path / "s.svs", 512, 384, seed=1, min_level_size=64)
    tif, _ = write_synthetic_slide(tmp_path / "s.tif", 512, 384, seed=1, min_level_size=64)
    s = openslide.OpenSlide(svs)
    if default == "aperio":
        assert s.level_dimensions == ((512, 384), (128, 96), (32, 24))
        assert sorted(s.associated_images) == ["label", "macro", "thumbnail"]
    else:
        assert s.level_dimensions == ((512, 384), (256, 192), (128, 96), (64, 48))
        assert not s.associated_images
    assert openslide.OpenSlide(tif).level_dimensions == ((512, 384), (256, 192), (128, 96), (64, 48))


def test_cli_synth_layout(tmp_path, capsys):
    out = tmp_path / "c.svs"
    assert cli.main(["synth", str(out), "--size", "512x384", "--seed", "2", "--layout", "aperio"]) == 0
    assert sorted(openslide.OpenSlide(out).associated_images) == ["label", "macro", "thumbnail"]
    assert cli.main(["synth", str(tmp_path / "c.tif"), "--size", "512x384", "--layout", "aperio"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "c.tif: layout 'aperio'" in err and ".svs" in err
    assert not (tmp_path / "c.tif").exists()
