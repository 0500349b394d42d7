"""Tile grid geometry against a brute-force walk, the paper's background rule on a hand-made slide, the
tissue fraction, the prefilter, and level selection."""
from __future__ import annotations

import numpy as np
import pytest

from fastgicn.config import TileConfig
from fastgicn.errors import ConfigError
from fastgicn.slide import TissueMask, open_slide
from fastgicn.tiling import grid_shape, keep_tile, read_level_for, tile_grid, tiles_touching_mask, tissue_tiles
from slide_fixtures import he_like, write_pyramid


def brute_force_starts(extent: int, tile: int, stride: int) -> list[int]:
    """Walk from 0 by `stride` until a tile reaches the end of the extent."""
    starts = [0]
    while starts[-1] + tile < extent:
        starts.append(starts[-1] + stride)
    return starts


@pytest.mark.parametrize("tile,overlap", [(32, 0), (64, 16), (512, 0), (512, 64), (48, 24)])
def test_grid_geometry_against_brute_force(tile, overlap):
    stride = tile - overlap
    rng = np.random.default_rng(tile + overlap)
    for w, h in [(1, 1), (tile, tile), (tile + 1, tile - 1), (3 * stride + overlap, 2 * stride + overlap)] + \
            [tuple(rng.integers(1, 5 * tile, 2)) for _ in range(20)]:
        grid = tile_grid(int(w), int(h), tile, stride)
        xs, ys = brute_force_starts(int(w), tile, stride), brute_force_starts(int(h), tile, stride)
        expect = np.array([(x, y, tile, tile) for y in ys for x in xs], np.int64)
        np.testing.assert_array_equal(grid, expect)
        assert grid.dtype == np.int64 and grid_shape(int(w), int(h), tile, stride) == (len(ys), len(xs))
        # covering and minimal: the last tile reaches the edge, the one before does not
        assert xs[-1] + tile >= w and (len(xs) == 1 or xs[-2] + tile < w)
        # neighbours share exactly `overlap` pixels
        if len(xs) > 1:
            assert xs[0] + tile - xs[1] == overlap


def test_grid_in_level0_pixels_for_a_downsampled_level():
    grid = tile_grid(250, 175, 64, 48, downsample=4.0)
    assert grid_shape(250, 175, 64, 48) == (4, 5)
    np.testing.assert_array_equal(np.unique(grid[:, 0]), [0, 192, 384, 576, 768])
    np.testing.assert_array_equal(np.unique(grid[:, 1]), [0, 192, 384, 576])
    assert (grid[:, 2:] == 256).all()
    # a non-integer downsample (as OpenSlide reports for some scanners) rounds to the nearest pixel
    grid = tile_grid(100, 40, 32, 32, downsample=4.0003)
    np.testing.assert_array_equal(grid[:4, 0], np.rint(np.array([0, 32, 64, 96]) * 4.0003))
    assert grid[0, 2] == 128
    for bad in [dict(lvl_width=0), dict(stride=0), dict(stride=65), dict(tile_size=0), dict(downsample=0.5)]:
        kw = dict(lvl_width=100, lvl_height=100, tile_size=64, stride=64, downsample=1.0) | bad
        with pytest.raises(ConfigError):
            tile_grid(**kw)


# ---------------------------------------------------------------------------------------------------
# The paper's rule on a hand-made slide: 64 x 64 tiles, 5 x 3 grid, the last column and row partial.

T = 64


def paper_slide() -> tuple[np.ndarray, dict[tuple[int, int], bool]]:
    W, H = 4 * T + 20, 2 * T + 30          # 5 columns (the last 20 px wide), 3 rows (the last 30 px high)
    img = np.full((H, W, 3), 255, np.uint8)
    keep = {}

    def tile(r, c):
        return img[r * T:(r + 1) * T, c * T:(c + 1) * T]

    keep[0, 0] = False                                     # glass
    tile(0, 1)[:] = 221; keep[0, 1] = False                # every channel 221: above 220, discarded
    tile(0, 2)[:] = 220; keep[0, 2] = True                 # 220 is not above 220: kept
    tile(0, 3)[17, 5] = (90, 40, 120); keep[0, 3] = True   # one dark pixel: kept
    tile(0, 4)[:] = 230; keep[0, 4] = False                # edge tile, in-slide part near-white
    tile(1, 0)[:] = (210, 140, 190); keep[1, 0] = True     # tissue
    tile(1, 1)[:] = 240; tile(1, 1)[63, 63] = (221, 221, 220); keep[1, 1] = True   # one channel at 220
    tile(1, 2)[:, :] = 250; keep[1, 2] = False
    keep[1, 3] = False
    tile(1, 4)[3, 19] = (150, 80, 160); keep[1, 4] = True  # edge tile: one tissue pixel in its 20 columns
    tile(2, 0)[29, 0] = (100, 100, 100); keep[2, 0] = True  # bottom edge tile, last in-slide row
    keep[2, 1] = keep[2, 2] = keep[2, 3] = keep[2, 4] = False
    return img, keep


def reference_background(img: np.ndarray, grid: np.ndarray, threshold: int) -> np.ndarray:
    """Crop each tile and pad it white with np.pad, then count pixels with every channel > threshold."""
    counts = []
    H, W = img.shape[:2]
    for x, y, w, h in grid:
        crop = img[y:min(y + h, H), x:min(x + w, W)]
        tile = np.pad(crop, ((0, h - crop.shape[0]), (0, w - crop.shape[1]), (0, 0)), constant_values=255)
        counts.append(int(np.all(tile > threshold, axis=-1).sum()))
    return np.array(counts)


def test_paper_rule_on_hand_made_slide():
    img, keep = paper_slide()
    cfg = TileConfig(tile_size=T, min_tissue_fraction=0.0, tissue_prefilter=False)
    kept = tissue_tiles(open_slide(img), cfg)
    expect = np.array([(c * T, r * T, T, T) for (r, c), k in sorted(keep.items()) if k], np.int64)
    np.testing.assert_array_equal(kept, expect)
    # and the independent reference count gives the same selection
    grid = tile_grid(img.shape[1], img.shape[0], T, T)
    np.testing.assert_array_equal(kept, grid[reference_background(img, grid, 220) < T * T])
    assert len(kept) == 6


def test_min_tissue_fraction_boundary():
    img = np.full((T, 3 * T, 3), 255, np.uint8)
    n = T * T
    # exactly 1 % of a tile is tissue (rounded up to whole pixels), 1 pixel less, and half a tile
    need = int(np.ceil(0.01 * n))
    ys, xs = np.unravel_index(np.arange(need), (T, T))
    img[ys, xs] = (200, 100, 150)
    img[ys[:-1], T + xs[:-1]] = (200, 100, 150)
    img[: T // 2, 2 * T:] = (200, 100, 150)
    slide = open_slide(img)
    kept = tissue_tiles(slide, TileConfig(tile_size=T, min_tissue_fraction=0.01, tissue_prefilter=False))
    np.testing.assert_array_equal(kept[:, 0], [0, 2 * T])
    kept = tissue_tiles(slide, TileConfig(tile_size=T, min_tissue_fraction=0.5, tissue_prefilter=False))
    np.testing.assert_array_equal(kept[:, 0], [2 * T])
    kept = tissue_tiles(slide, TileConfig(tile_size=T, min_tissue_fraction=0.0, tissue_prefilter=False))
    np.testing.assert_array_equal(kept[:, 0], [0, T, 2 * T])
    # keep_tile is elementwise and matches the definition
    bg = np.array([n, n - 1, n - need, n - need + 1, 0])
    np.testing.assert_array_equal(keep_tile(bg, n, 0.0), [False, True, True, True, True])
    np.testing.assert_array_equal(keep_tile(bg, n, 0.01), [False, False, True, False, True])


def test_white_threshold_is_taken_from_the_config():
    img = np.full((T, 2 * T, 3), 200, np.uint8)
    img[:, T:] = 255
    slide = open_slide(img)
    paper = TileConfig(tile_size=T, min_tissue_fraction=0, tissue_prefilter=False)
    assert len(tissue_tiles(slide, paper)) == 1
    assert len(tissue_tiles(slide, TileConfig(tile_size=T, min_tissue_fraction=0, tissue_prefilter=False,
                                              white_threshold=199))) == 0


def test_prefilter_skips_glass_and_keeps_tissue():
    img = he_like(700, 1000, seed=3)
    img[650, 950] = (20, 20, 20)   # a speck of dust: the paper's rule keeps its tile, the prefilter does not
    slide = open_slide(img, mpp=0.25)
    paper = tissue_tiles(slide, TileConfig(tile_size=64, min_tissue_fraction=0, tissue_prefilter=False))
    pre = tissue_tiles(slide, TileConfig(tile_size=64, min_tissue_fraction=0, tissue_prefilter=True))
    as_set = lambda g: {tuple(r) for r in g}
    assert as_set(pre) < as_set(paper)
    assert (896, 640, 64, 64) in as_set(paper) and (896, 640, 64, 64) not in as_set(pre)
    # no tile with a real amount of tissue is lost to the prefilter
    grid = tile_grid(1000, 700, 64, 64)
    bg = reference_background(img, grid, 220)
    substantial = as_set(grid[bg <= 0.95 * 64 * 64])
    assert substantial <= as_set(pre)
    # read=False stops after the prefilter; workers=2 reads the same
    candidates = tissue_tiles(slide, TileConfig(tile_size=64), read=False)
    assert as_set(pre) <= as_set(candidates) < as_set(grid)
    np.testing.assert_array_equal(tissue_tiles(slide, TileConfig(tile_size=64), workers=2),
                                  tissue_tiles(slide, TileConfig(tile_size=64)))


def test_tiles_touching_mask_uses_level0_geometry():
    m = np.zeros((10, 10), bool)
    m[4, 6] = True                                     # covers level-0 [32, 40) x [48, 56) at downsample 8
    grid = np.array([[48, 32, 8, 8], [40, 32, 8, 8], [56, 32, 8, 8], [0, 0, 32, 32], [47, 39, 2, 2]],
                    np.int64)
    np.testing.assert_array_equal(tiles_touching_mask(grid, TissueMask(m, 8), margin=0),
                                  [True, False, False, False, True])
    np.testing.assert_array_equal(tiles_touching_mask(grid, TissueMask(m, 8), margin=1),
                                  [True, True, True, False, True])


def test_level_selection_for_the_grid(tmp_path):
    write_pyramid(tmp_path / "s.tif", he_like(700, 1000))
    with open_slide(tmp_path / "s.tif") as slide:
        cfg = TileConfig(tile_size=64, target_mpp=0.5, min_tissue_fraction=0, tissue_prefilter=False)
        assert read_level_for(slide, cfg) == 1
        kept = tissue_tiles(slide, cfg)
        assert (kept[:, 2:] == 128).all() and (kept[:, :2] % 128 == 0).all()
        # every tile of level 1 is there except the glass ones: compare with reading level 1 by NumPy
        lvl1 = slide.read_level(1)
        grid = tile_grid(500, 350, 64, 64, 2.0)
        bg = reference_background(lvl1, grid // np.array([2, 2, 2, 2]), 220)
        np.testing.assert_array_equal(kept, grid[bg < 64 * 64])
        assert read_level_for(slide, TileConfig(level=2)) == 2
        assert read_level_for(slide, TileConfig()) == 0
        with pytest.raises(ConfigError, match="levels 0..2"):
            tissue_tiles(slide, TileConfig(level=3))
        with pytest.raises(ConfigError, match="does not upsample"):
            tissue_tiles(slide, TileConfig(target_mpp=0.1))
        with pytest.raises(ConfigError, match="TileConfig"):
            tissue_tiles(slide, {"tile_size": 64})
