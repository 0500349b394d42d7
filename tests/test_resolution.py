"""Reading at any resolution: which level is read and how it is reduced, checked against NumPy references on
an Aperio-like 40x pyramid (levels at downsample 1, 4, 16: no 20x level)."""
from __future__ import annotations

import numpy as np
import pytest
import tifffile

from fastgicn.config import TileConfig
from fastgicn.errors import ConfigError
from fastgicn.slide import Resolution, open_slide
from fastgicn.tiling import tile_grid, tissue_tiles
from fastgicn.slide.resolution import area_span
from slide_fixtures import APERIO_DESCRIPTION, he_like, padded

W0, H0 = 1203, 811   # odd: reductions meet partial blocks at the right and bottom edges


def quarter(rgb: np.ndarray) -> np.ndarray:
    h, w = rgb.shape[0] // 4, rgb.shape[1] // 4
    return ((rgb[:h * 4, :w * 4].reshape(h, 4, w, 4, 3).astype(np.uint32).sum(axis=(1, 3)) + 8) // 16).astype(np.uint8)


@pytest.fixture(scope="module")
def aperio(tmp_path_factory):
    """An SVS with levels at 1, 4 and 16 (deflate, so the stored pixels are known exactly)."""
    path = tmp_path_factory.mktemp("res") / "forty.svs"
    levels = [he_like(H0, W0, seed=3)]
    for _ in range(2):
        levels.append(quarter(levels[-1]))
    with tifffile.TiffWriter(path) as tw:
        for i, arr in enumerate(levels):
            kw = {"description": APERIO_DESCRIPTION.format(w=W0, h=H0)} if i == 0 else {"subfiletype": 1}
            tw.write(arr, tile=(256, 256), photometric="rgb", compression="zlib", metadata=None, **kw)
    return path, levels



def box_reference(level: np.ndarray, lx: int, ly: int, w: int, h: int, f: int) -> np.ndarray:
    """NumPy: f x f means (rounded half up) of the level's pixels from (lx, ly), white outside."""
    src = padded(level, lx, ly, w * f, h * f).astype(np.float64)
    return np.floor(src.reshape(h, f, w, f, 3).mean(axis=(1, 3)) + 0.5).astype(np.uint8)


def area_reference(level: np.ndarray, ox: float, oy: float, w: int, h: int, f: float) -> np.ndarray:
    """NumPy: the dense definition of an area average, every source pixel weighted by its covered fraction."""
    x0, x1 = area_span(ox, w, f)
    y0, y1 = area_span(oy, h, f)
    src = padded(level, x0, y0, x1 - x0, y1 - y0).astype(np.float64)

    def cover(o, n, start, stop):
        e = o + np.arange(n + 1) * f
        px = np.arange(start, stop)[None, :]
        return np.clip(np.minimum(e[1:, None], px + 1) - np.maximum(e[:-1, None], px), 0, None) / f

    return np.einsum("jx,iy,yxc->ijc", cover(ox, w, x0, x1), cover(oy, h, y0, y1), src)


def test_choice_of_level_and_reduction(aperio):
    path, _ = aperio
    with open_slide(path) as slide:
        assert slide.reader == "direct" and slide.mpp == pytest.approx(0.25)
        ds = slide.level_downsamples
        assert ds[1] == pytest.approx(4, abs=0.05) and ds[2] == pytest.approx(16, abs=0.3)   # not integers, as on scanners
        half = slide.resolution_for(0.5)      # no 20x level: level 0 reduced 2x, exactly
        assert (half.level, half.integer_factor, half.reduced) == (0, 2, True)
        assert half.dimensions == (-(-W0 // 2), -(-H0 // 2)) and half.downsample == 2
        assert slide.resolution_for(1.0) == Resolution(1, 1.0, ds[1], slide.level_dimensions[1])
        two = slide.resolution_for(2.0)         # 8x: level 1 (4x) reduced 2x
        assert (two.level, two.integer_factor) == (1, 2)
        odd = slide.resolution_for(0.6)         # 2.4x: no integer within 15 %, an area average from level 0
        assert odd.level == 0 and odd.integer_factor is None and odd.factor == pytest.approx(2.4)
        assert slide.resolution_for(magnification=20).integer_factor == 2
        with pytest.raises(ConfigError, match="does not upsample"):
            slide.resolution_for(0.1)
        rep = half.to_dict(slide.mpp)
        assert rep["level"] == 0 and rep["reduction"] == 2 and rep["mpp"] == pytest.approx(0.5)
        assert rep["reduction_filter"] == "box mean"


REGIONS = [(0, 0, 64, 64), (37, 11, 50, 33), (1100, 700, 64, 64), (-10, -7, 30, 20), (1202, 810, 3, 3),
           (5000, 10, 8, 8)]


def test_integer_reduction_equals_numpy_box_mean(aperio):
    path, levels = aperio
    with open_slide(path) as slide:
        for res in (slide.resolution_for(0.5), slide.resolution_for(2.0)):
            f, ds = res.integer_factor, res.level_downsample
            for x, y, w, h in REGIONS:
                l0_x, l0_y = int(round(x * res.downsample)), int(round(y * res.downsample))
                out = np.empty((h, w, 3), np.uint8)
                background = slide.read_into(out, l0_x, l0_y, res, 220)
                lx, ly = int(np.floor(l0_x / ds + 0.5)), int(np.floor(l0_y / ds + 0.5))
                ref = box_reference(levels[res.level], lx, ly, w, h, f)
                np.testing.assert_array_equal(out, ref, err_msg=f"{res} {(x, y, w, h)}")
                assert background == int((ref > 220).all(axis=2).sum())


def test_fractional_reduction_equals_numpy_area_average(aperio):
    path, levels = aperio
    with open_slide(path) as slide:
        res = slide.resolution_for(0.6)
        for x, y, w, h in REGIONS[:5]:
            l0_x, l0_y = int(round(x * res.downsample)), int(round(y * res.downsample))
            out = slide.read_region(l0_x, l0_y, res, w, h)
            exact = area_reference(levels[0], l0_x / 1.0, l0_y / 1.0, w, h, res.factor)
            ref = np.floor(exact + 0.5)
            # equal but where the true mean is a half (k + 1/2 exactly: 2.4^2 = 144/25, so sums of
            # 1/36ths make ties), which float rounding may send either way
            differ = out != ref
            assert np.abs(out - ref).max() <= 1
            np.testing.assert_allclose(exact[differ] % 1, 0.5, atol=1e-6, err_msg=f"{(x, y, w, h)}")


def test_tiles_of_a_reduced_resolution(aperio):
    path, levels = aperio
    with open_slide(path) as slide:
        cfg = TileConfig(tile_size=64, target_mpp=0.5, min_tissue_fraction=0, tissue_prefilter=False)
        kept = tissue_tiles(slide, cfg)
        grid = tile_grid(-(-W0 // 2), -(-H0 // 2), 64, 64, 2.0)
        assert (kept[:, 2:] == 128).all()
        # the paper's glass rule on the NumPy-reduced tiles
        keep = [not (box_reference(levels[0], int(x), int(y), 64, 64, 2) > 220).all() for x, y, _, _ in grid]
        np.testing.assert_array_equal(kept, grid[np.array(keep)])


def test_dpi_placeholder_is_not_a_resolution(tmp_path):
    path = tmp_path / "office.tif"
    rgb = he_like(600, 800)
    tifffile.imwrite(path, rgb, tile=(256, 256), photometric="rgb", compression="zlib", resolution=(72, 72),
                     resolutionunit="INCH", metadata=None)
    with open_slide(path) as slide:
        assert slide.mpp is None and "--mpp" in slide.mpp_note and "--level" in slide.mpp_note
        with pytest.raises(ConfigError, match=r"office\.tif.*352\.8.*--mpp"):
            slide.resolution_for(0.5)
    with open_slide(path, mpp=0.25) as slide:   # --mpp fills it in (and overrides a recorded value)
        assert slide.mpp == 0.25 and slide.resolution_for(0.5).integer_factor == 2


def test_thumbnail_reads_a_level_a_hair_coarser_than_asked(tmp_path):
    """Scanners store 16x as 16.02x: the tissue mask must read that level, not the 4x one below it."""
    path = tmp_path / "hair.svs"
    level0 = he_like(1604, 1604, seed=5)
    small = quarter(quarter(level0))[:100, :100]            # 1604 / 100 = 16.04x
    with tifffile.TiffWriter(path) as tw:
        tw.write(level0, tile=(256, 256), photometric="rgb", compression="zlib", metadata=None,
                 description=APERIO_DESCRIPTION.format(w=1604, h=1604))
        tw.write(small, tile=(64, 64), photometric="rgb", compression="zlib", metadata=None, subfiletype=1)
    with open_slide(path) as slide:
        assert slide.level_downsamples[1] == pytest.approx(16.04)
        levels = []
        original = slide._read
        slide._read = lambda out, x, y, level, t: levels.append(level) or original(out, x, y, level, t)
        thumb = slide.downsampled(16)
        assert set(levels) == {1} and thumb.shape == (101, 101, 3)
        # the thumbnail is that level, resized by 16.04 / 16 (0.25 %): within a grey level or two of it
        assert np.abs(thumb[:99, :99].astype(int) - small[:99, :99]).mean() < 2
