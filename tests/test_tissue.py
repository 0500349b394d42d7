"""Tissue mask: Otsu against a brute-force reference, the mask steps on hand-drawn images, and the
guarantee that the mask is made from a low pyramid level."""
from __future__ import annotations

import numpy as np
import pytest

from fastgicn.errors import ConfigError
from fastgicn.slide import mask_from_rgb, open_slide, otsu_threshold, tissue_mask
from fastgicn.slide.tissue import mask_downsample
from slide_fixtures import he_like, write_pyramid


def brute_force_otsu(values: np.ndarray) -> int:
    """The t minimising the within-class variance of (<= t, > t), by trying every t (lowest on ties)."""
    v = values.astype(np.float64).ravel()
    best, best_t = np.inf, 0
    for t in range(256):
        lo, hi = v[v <= t], v[v > t]
        within = (lo.var() * lo.size if lo.size else 0.0) + (hi.var() * hi.size if hi.size else 0.0)
        if within < best * (1 - 1e-9):
            best, best_t = within, t
    return best_t


@pytest.mark.parametrize("seed", range(4))
def test_otsu_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    values = np.concatenate([rng.normal(20 + 10 * seed, 6, 400), rng.normal(120 + 20 * seed, 15, 250)])
    values = np.clip(np.rint(values), 0, 255).astype(np.uint8)
    t = otsu_threshold(values)
    assert t == brute_force_otsu(values)
    assert otsu_threshold(np.full(10, 7, np.uint8)) == 0


def glass(h, w, seed=0):
    """Near-white glass with a little grey noise (chroma below 6)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(236, 250, (h, w, 1))
    return np.clip(base + rng.integers(-2, 3, (h, w, 3)), 0, 255).astype(np.uint8)


def test_mask_steps_on_a_drawn_image():
    img = glass(200, 300)
    expect = np.zeros((200, 300), bool)
    img[20:80, 30:120] = (225, 150, 195)           # eosin-pink block
    expect[20:80, 30:120] = True
    img[40:50, 60:70] = glass(10, 10, 1)            # small lumen inside it: filled
    img[100:180, 150:280] = (140, 80, 160)          # haematoxylin-purple block with a large hole
    expect[100:180, 150:280] = True
    img[110:170, 160:270] = glass(60, 110, 2)       # 6600 px of glass: larger than max_hole, stays glass
    expect[110:170, 160:270] = False
    img[150:152, 40:42] = (30, 30, 30)              # dark speck of 4 px: removed as an object < 16 px
    img[5:7, 250:252] = (200, 110, 180)             # pink speck: removed too
    mask = mask_from_rgb(img, downsample=4, min_object_l0=16 * 16, max_hole_l0=4000 * 16)
    np.testing.assert_array_equal(mask, expect)
    # without the clean-up steps, the speck and the lumen show
    raw = mask_from_rgb(img, downsample=4, min_object_l0=0, max_hole_l0=0)
    assert raw[150, 40] and raw[5, 250] and not raw[45, 65]


def test_all_glass_and_all_tissue_are_not_split_by_otsu():
    assert not mask_from_rgb(glass(64, 64), min_object_l0=0, max_hole_l0=0).any()
    # pale and dark tissue everywhere: Otsu alone would cut between them; the clamp keeps both
    tissue = np.zeros((64, 64, 3), np.uint8)
    tissue[:, :32] = (235, 205, 225)        # pale stroma, chroma 30
    tissue[:, 32:] = (120, 60, 150)         # dark nuclei region, chroma 90
    assert mask_from_rgb(tissue, downsample=8).all()
    grey = np.full((32, 32, 3), 120, np.uint8)   # no chroma but dark: pen or fold, kept like the paper would
    assert mask_from_rgb(grey, min_object_l0=0).all()
    with pytest.raises(ConfigError):
        mask_from_rgb(tissue.astype(np.float32))
    with pytest.raises(ConfigError):
        mask_from_rgb(tissue, min_chroma=30, max_chroma=10)


def test_mask_downsample_is_the_smallest_fitting_power_of_two():
    assert mask_downsample((1000, 700), 2048) == 1
    assert mask_downsample((1000, 700), 500) == 2
    assert mask_downsample((100_000, 80_000), 2048) == 64   # 100000 / 64 = 1563 <= 2048 < 3125
    assert mask_downsample((4096, 10), 2048) == 2
    with pytest.raises(ConfigError):
        mask_downsample((10, 10), 0)


def test_tissue_mask_of_a_pyramid_reads_only_a_low_level(tmp_path, monkeypatch):
    level0 = he_like(700, 1000)
    write_pyramid(tmp_path / "s.tif", level0)
    with open_slide(tmp_path / "s.tif") as slide:
        levels = []
        original = slide._read
        monkeypatch.setattr(slide, "_read",
                            lambda out, x, y, lv, t: levels.append(lv) or original(out, x, y, lv, t))
        tm = tissue_mask(slide, max_side=256)
        assert tm.downsample == 4 and tm.mask.shape == (175, 250)
        assert set(levels) == {2}
    # the same mask from the level-0 pixels shrunk by NumPy, and from the array slide
    ref = mask_from_rgb(open_slide(level0).downsampled(4), 4)
    agree = (tm.mask == ref).mean()
    assert agree > 0.995
    # geometry: the blobs he_like draws are where the mask says (centre of the first one)
    cy, cx = int(0.35 * 700) // 4, int(0.3 * 1000) // 4
    assert tm.mask[cy, cx] and not tm.mask[2, 2]
    with pytest.raises(ConfigError):
        tissue_mask(open_slide(level0), downsample=0)


@pytest.mark.parametrize("seed", range(3))
def test_dust_and_holes_match_an_ndimage_reference(seed):
    """Objects under min_object_l0 (8-connected) go, background pieces up to max_hole_l0 not touching the border
    (4-connected) fill: the same as scipy.ndimage labelling and binary_fill_holes restricted by size."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.random((160, 200)), 1.5)
    tissue = field > np.quantile(field, 0.55)
    rgb = np.where(tissue[..., None], np.uint8([180, 90, 160]), np.uint8([242, 242, 242])).astype(np.uint8)
    ds, min_obj, max_hole = 4, 12 * 16, 30 * 16  # 12 and 30 pixels at downsample 4
    got = mask_from_rgb(rgb, ds, min_object_l0=min_obj, max_hole_l0=max_hole)

    want = tissue.copy()
    labels, n = ndimage.label(want, structure=np.ones((3, 3), bool))
    sizes = ndimage.sum_labels(np.ones_like(labels), labels, range(1, n + 1))
    for k, size in enumerate(sizes, 1):
        if size < 12:
            want[labels == k] = False
    holes = ndimage.binary_fill_holes(want) & ~want
    hl, hn = ndimage.label(holes)
    for k in range(1, hn + 1):
        if (hl == k).sum() <= 30:
            want[hl == k] = True
    assert 0 < (got != tissue).sum()  # some dust and holes were there to clean
    np.testing.assert_array_equal(got, want)
