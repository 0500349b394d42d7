"""Polygons -> masks (fastgicn.annotations.rasterise) against shapely at pixel centres, hand values and
OpenSlide."""
from __future__ import annotations

import tracemalloc

import numpy as np
import openslide
import pytest
import shapely
from shapely.geometry import Polygon

from fastgicn.annotations import Annotations, MaskRenderer, PolygonRaster, Region, write_mask


def _star(rng, cx, cy, n, rmin, rmax) -> np.ndarray:
    angles = np.sort(rng.random(n)) * 2 * np.pi
    radii = rng.uniform(rmin, rmax, n)
    return np.c_[cx + radii * np.cos(angles), cy + radii * np.sin(angles)]


def _region(*rings, name="r") -> Region:
    return Region(name, None, tuple(np.asarray(r, np.float64) for r in rings))


def _paint(regions, h, w, x0=0, y0=0, downsample=1.0) -> np.ndarray:
    out = np.zeros((h, w), np.uint8)
    PolygonRaster(regions, downsample).paint(out, x0, y0)
    return out


def _centres(h, w, x0=0, y0=0, downsample=1.0):
    rows, cols = np.mgrid[0:h, 0:w]
    return (cols + x0 + 0.5) * downsample, (rows + y0 + 0.5) * downsample


@pytest.mark.parametrize("downsample", [1.0, 2.0, 3.5])
def test_random_polygons_with_holes_match_shapely_at_pixel_centres(downsample):
    """Sub-pixel vertices, holes, windows that cut the polygon: every pixel is tumour exactly when shapely
    says its centre lies inside (the independent reference)."""
    rng = np.random.default_rng(7)
    checked = inside_total = 0
    while checked < 120:
        outline = _star(rng, *rng.uniform(60, 140, 2), int(rng.integers(3, 40)), 8, 70)
        holes = [_star(rng, *outline.mean(0), 7, 1.5, 6)] if checked % 2 else []
        poly = Polygon(outline, holes)
        if not poly.is_valid:
            continue
        checked += 1
        h, w = 70, 90
        x0, y0 = (int(v) for v in rng.integers(-20, 80, 2) / downsample)
        got = _paint([_region(outline, *holes)], h, w, x0, y0, downsample) > 0
        xs, ys = _centres(h, w, x0, y0, downsample)
        want = shapely.contains_xy(poly, xs, ys)
        inside_total += int(want.sum())
        np.testing.assert_array_equal(got, want, err_msg=f"polygon {checked}")
    assert inside_total > 50_000 / downsample ** 2  # the test looked at real areas, not empty windows


def test_centres_on_edges_follow_the_top_left_rule_and_shared_edges_split_cleanly():
    # a square whose edges pass exactly through pixel centres: left/top edges inside, right/bottom outside
    square = [(0.5, 0.5), (2.5, 0.5), (2.5, 2.5), (0.5, 2.5)]
    got = _paint([_region(square)], 4, 4)
    want = np.zeros((4, 4), np.uint8)
    want[0:2, 0:2] = 255
    np.testing.assert_array_equal(got, want)
    # two squares sharing an edge through centres: each centre belongs to exactly one of them
    left = [(0.5, 0.5), (2.5, 0.5), (2.5, 3.5), (0.5, 3.5)]
    right = [(2.5, 0.5), (4.5, 0.5), (4.5, 3.5), (2.5, 3.5)]
    a, b = _paint([_region(left)], 5, 6), _paint([_region(right)], 5, 6)
    assert not (a & b).any()
    np.testing.assert_array_equal((a | b) > 0, _paint([_region([(0.5, 0.5), (4.5, 0.5), (4.5, 3.5),
                                                                 (0.5, 3.5)])], 5, 6) > 0)


def test_even_odd_self_intersection_and_union_of_polygons():
    # a pentagram: its tips are inside, its central pentagon (crossed twice) is outside by even-odd
    angles = np.pi / 2 + np.arange(5) * 4 * np.pi / 5
    star = np.c_[50 + 40 * np.cos(angles), 50 - 40 * np.sin(angles)]
    got = _paint([_region(star)], 100, 100)
    assert got[49, 49] == 0                     # the centre
    assert got[50 - 30, 49] == 255              # inside the top tip
    # a polygon with a hole, and a second polygon filling that hole: the union keeps the hole tumour
    outer = _region([(0, 0), (20, 0), (20, 20), (0, 20)], [(5, 5), (15, 5), (15, 15), (5, 15)])
    plug = _region([(4, 4), (16, 4), (16, 16), (4, 16)])
    assert (_paint([outer], 20, 20) > 0).sum() == 400 - 100
    assert (_paint([outer, plug], 20, 20) > 0).all()


def test_exclusion_is_cut_out_of_the_tumour():
    tumour = [_region([(0, 0), (30, 0), (30, 30), (0, 30)])]
    excluded = [_region([(10, 10), (20, 10), (20, 20), (10, 20)])]
    mask = MaskRenderer(Annotations("hand", tumour, excluded)).render(0, 0, 40, 40)
    want = np.zeros((40, 40), np.uint8)
    want[:30, :30] = 255
    want[10:20, 10:20] = 0
    np.testing.assert_array_equal(mask, want)


def test_a_traced_mask_rasterises_back_to_itself():
    """fastgicn.outputs.polygons traces along pixel edges; the centre rule gives the very same pixels back."""
    from fastgicn.outputs.polygons import mask_to_polygons

    rng = np.random.default_rng(3)
    from scipy import ndimage

    mask = ndimage.gaussian_filter(rng.random((180, 220)), 4) > 0.52
    geoms = mask_to_polygons(mask).geoms
    regions = []
    for g in geoms:
        for part in getattr(g, "geoms", [g]):
            regions.append(_region(np.asarray(part.exterior.coords)[:-1],
                                   *[np.asarray(i.coords)[:-1] for i in part.interiors]))
    assert len(regions) > 5
    np.testing.assert_array_equal(_paint(regions, 180, 220) > 0, mask)


def test_written_mask_opens_in_openslide_with_the_mpp_and_levels(tmp_path):
    rng = np.random.default_rng(5)
    regions = [_region(_star(rng, 300, 200, 30, 40, 150)), _region(_star(rng, 700, 500, 12, 20, 90))]
    excluded = [_region([(280, 180), (320, 180), (320, 220), (280, 220)])]
    ann = Annotations(tmp_path / "hand.geojson", regions, excluded)
    written = write_mask(tmp_path / "m.tif", ann, 1000, 700, mpp=0.2527, tile=256)
    want = MaskRenderer(ann).render(0, 0, 1000, 700)
    with openslide.OpenSlide(str(tmp_path / "m.tif")) as s:
        assert s.dimensions == (1000, 700) and s.level_count >= 1
        assert float(s.properties["openslide.mpp-x"]) == pytest.approx(0.2527, rel=1e-4)
        got = np.asarray(s.read_region((0, 0), 0, (1000, 700)))[..., 0]
    np.testing.assert_array_equal(got, want)  # lossless, 0 / 255 only
    assert set(np.unique(got)) == {0, 255}
    assert written.tumour_pixels == int((want > 0).sum()) and written.regions == 2


def test_a_large_slide_is_rasterised_in_bands_not_as_one_array(tmp_path):
    """16384 x 16384 (268 MB as one uint8 array): the peak of traced NumPy memory stays far below it."""
    side = 16384
    regions = [_region([(100.3, 100.7), (side - 200.2, 300.1), (side - 900.5, side - 50.5),
                        (40.25, 9000.75)])]
    tracemalloc.start()
    try:
        written = write_mask(tmp_path / "big.tif", Annotations("hand", regions), side, side)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 80e6, f"peak traced memory {peak / 1e6:.0f} MB"
    expected = shapely.area(Polygon(regions[0].rings[0]))
    assert written.tumour_pixels == pytest.approx(expected, rel=1e-3)
