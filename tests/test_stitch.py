"""Stitcher geometry: with a purely local model, stitching any tiling equals running it on the whole image."""
import numpy as np
import pytest
from scipy import ndimage

from fastgicn.errors import ConfigError
from fastgicn.slide.stitch import Stitcher, ramp, stitch_to_array


def regular_grid(width, height, tile, overlap):
    """Tile origins every `tile - overlap` pixels until the image is covered (independent of the slide grid)."""
    stride = tile - overlap

    def starts(extent):
        n = max(1, -(-(extent - overlap) // stride))
        return [i * stride for i in range(n)]

    return np.array([(x, y) for y in starts(height) for x in starts(width)], np.int64)


def local_model(image, radius):
    """A purely local 'network': a (2r+1)^2 box filter with zero padding, quantised to uint8."""
    k = 2 * radius + 1
    out = ndimage.correlate(image.astype(np.float64), np.ones((k, k)) / (k * k), mode="constant", cval=0.0)
    # make it less trivial than a mean: a nonlinear point-wise map after the local sum
    return np.clip(np.rint(255 * (out / 255) ** 1.7), 0, 255).astype(np.uint8)


def tiles_of(image, grid, tile, fill=255):
    """Cut tiles like the reader does: pixels beyond the right and bottom edges are white."""
    h, w = image.shape
    padded = np.full((h + 2 * tile, w + 2 * tile), fill, image.dtype)
    padded[:h, :w] = image
    return [padded[y:y + tile, x:x + tile] for x, y in grid]


def reference(image, radius, tile):
    """The model on the whole image, with white beyond the right and bottom edges as the tiles see it."""
    h, w = image.shape
    padded = np.full((h + tile, w + tile), 255, image.dtype)
    padded[:h, :w] = image
    return local_model(padded, radius)[:h, :w]


def make_image(h, w, seed):
    rng = np.random.default_rng(seed)
    smooth = ndimage.gaussian_filter(rng.random((h, w)), 3)
    return np.clip(255 * (smooth - smooth.min()) / (np.ptp(smooth) + 1e-9), 0, 255).astype(np.uint8)


# (height, width, tile, overlap, radius): odd sizes, edge tiles, single-tile images, the largest overlap
CASES = [
    (100, 130, 32, 2, 1),
    (97, 61, 32, 8, 1),
    (64, 64, 32, 0, 0),
    (45, 200, 40, 16, 2),
    (33, 33, 32, 4, 1),
    (20, 17, 32, 2, 1),
    (150, 90, 48, 24, 3),
]


@pytest.mark.parametrize("mode", ["crop", "blend"])
@pytest.mark.parametrize("h,w,tile,overlap,radius", CASES)
@pytest.mark.parametrize("order", ["grid", "reversed", "shuffled"])
def test_stitched_local_model_equals_whole_image(mode, h, w, tile, overlap, radius, order):
    if mode == "blend" and overlap < 4 * radius - 2:
        radius = max(0, (overlap + 2) // 4)  # blend discards a quarter of the overlap, crop half
    image = make_image(h, w, seed=h * w)
    grid = regular_grid(w, h, tile, overlap)
    preds = [local_model(t, radius) for t in tiles_of(image, grid, tile)]
    feed = {"grid": None, "reversed": list(range(len(grid)))[::-1],
            "shuffled": list(np.random.default_rng(0).permutation(len(grid)))}[order]
    stitched = stitch_to_array(grid, w, h, tile, preds, mode=mode, order=feed)
    np.testing.assert_array_equal(stitched, reference(image, radius, tile))


@pytest.mark.parametrize("mode", ["crop", "blend"])
def test_without_enough_overlap_the_seams_show(mode):
    """The proof above can fail: tiles with no overlap get the border pixels wrong."""
    h, w, tile = 90, 90, 32
    image = make_image(h, w, seed=1)
    grid = regular_grid(w, h, tile, 0)
    preds = [local_model(t, 1) for t in tiles_of(image, grid, tile)]
    stitched = stitch_to_array(grid, w, h, tile, preds, mode=mode)
    wrong = stitched != reference(image, 1, tile)
    assert wrong.any()
    rows, cols = np.nonzero(wrong)
    on_border = np.isin(rows % tile, [0, tile - 1]) | np.isin(cols % tile, [0, tile - 1])
    assert on_border.all()  # only at tile borders, where a tile cannot see its neighbour


def test_ramps_sum_to_one_and_zero_the_outer_quarter():
    for o in (2, 4, 6, 8, 16, 64, 256):
        r = ramp(o)
        np.testing.assert_allclose(r + r[::-1], 1.0, atol=1e-6)
        assert np.all(np.diff(r) <= 0)  # decreasing towards the left tile's edge
        assert np.all(r[o - o // 4:] == 0) and np.all(r[:o // 4] == 1)


def test_blend_of_constant_tiles_is_constant_and_a_step_becomes_a_ramp():
    h, w, tile, o = 40, 120, 32, 16
    grid = regular_grid(w, h, tile, o)
    const = stitch_to_array(grid, w, h, tile, [np.full((tile, tile), 77, np.uint8)] * len(grid), mode="blend")
    assert (const == 77).all()
    # alternate 0 / 200 per column of tiles: blending makes monotone ramps, crop makes steps
    vals = [0 if (x // (tile - o)) % 2 == 0 else 200 for x, _ in grid]
    preds = [np.full((tile, tile), v, np.uint8) for v in vals]
    blend = stitch_to_array(grid, w, h, tile, preds, mode="blend")[0].astype(int)
    crop = stitch_to_array(grid, w, h, tile, preds, mode="crop")[0].astype(int)
    assert np.abs(np.diff(blend)).max() < np.abs(np.diff(crop)).max() == 200
    assert len(np.unique(blend)) > 4


@pytest.mark.parametrize("mode", ["crop", "blend"])
def test_skipped_tiles_leave_background_and_the_rest_is_exact(mode):
    h, w, tile, o = 120, 150, 32, 8
    image = make_image(h, w, seed=5)
    grid = regular_grid(w, h, tile, o)
    rng = np.random.default_rng(3)
    skipped = set(rng.choice(len(grid), size=len(grid) // 3, replace=False).tolist())
    preds = [None if i in skipped else local_model(t, 1) for i, t in enumerate(tiles_of(image, grid, tile))]
    stitched = stitch_to_array(grid, w, h, tile, preds, mode=mode)
    ref = reference(image, 1, tile)
    # pixels owned by a present tile (its crop cell) match; cells of skipped tiles are 0
    full = stitch_to_array(grid, w, h, tile, [local_model(t, 1) for t in tiles_of(image, grid, tile)], mode="crop")
    np.testing.assert_array_equal(full, ref)
    owner = stitch_to_array(grid, w, h, tile, [np.full((tile, tile), 0 if i in skipped else 1, np.uint8)
                                               for i in range(len(grid))], mode="crop").astype(bool)
    if mode == "crop":
        np.testing.assert_array_equal(stitched[owner], ref[owner])
        assert (stitched[~owner] == 0).all()
    else:
        # exact where every tile covering the pixel is there; towards a skipped tile (predicting 0) it fades
        complete = np.ones((h, w), bool)
        for i in skipped:
            x, y = grid[i]
            complete[y:y + tile, x:x + tile] = False
        np.testing.assert_array_equal(stitched[complete], ref[complete])
        assert (stitched <= ref.astype(int) + 1).all()
        assert (~complete & owner & (stitched < ref)).any() and (stitched[~owner] < ref[~owner]).any()


def test_rows_flush_in_order_once_and_the_band_stays_small():
    h, w, tile, o = 1000, 300, 64, 16
    grid = regular_grid(w, h, tile, o)
    seen = []
    st = Stitcher(grid, w, h, tile, lambda y0, rows: seen.append((y0, rows.shape)), mode="blend")
    flushed_before_end = 0
    for i in range(len(grid)):
        st.add(i, np.full((tile, tile), 9, np.uint8))
        if i == len(grid) // 2:
            flushed_before_end = st.flushed
    st.close()
    ys = [y for y, _ in seen]
    assert ys[0] == 0 and all(b == a + s[0] for (a, s), b in zip(seen, ys[1:]))
    assert sum(s[0] for _, s in seen) == h and all(s[1] == w for _, s in seen)
    assert flushed_before_end > h // 3  # rows leave as soon as they are final, not at the end
    assert st.peak_band_rows <= 2 * tile


def test_out_of_order_tiles_wait_aside_and_the_band_never_grows():
    h, w, tile = 640, 64, 32
    grid = regular_grid(w, h, tile, 0)
    rows = []
    st = Stitcher(grid, w, h, tile, lambda y0, r: rows.append(r))
    order = list(range(1, len(grid))) + [0]  # the first tile last: nothing can flush until the end
    for i in order:
        st.add(i, np.full((tile, tile), i % 251, np.uint8))
    assert st.peak_band_rows == 2 * tile and st.peak_deferred >= len(grid) - 2 * (w // tile) * 2
    st.close()
    out = np.concatenate(rows)
    expected = np.zeros((h, w), np.uint8)
    for i, (x, y) in enumerate(grid):
        expected[y:y + tile, x:x + tile] = i % 251
    np.testing.assert_array_equal(out, expected)
    assert st.peak_deferred and not st._deferred


def test_errors_name_the_tile():
    grid = regular_grid(64, 64, 32, 0)
    st = Stitcher(grid, 64, 64, 32, lambda y0, rows: None)
    st.add(0, np.zeros((32, 32), np.uint8))
    with pytest.raises(ConfigError, match="tile 0 .* already"):
        st.add(0, np.zeros((32, 32), np.uint8))
    with pytest.raises(ConfigError, match="expected \\(32, 32\\)"):
        st.add(1, np.zeros((16, 32), np.uint8))
    with pytest.raises(ConfigError, match="never stitched"):
        st.close()
    with pytest.raises(ConfigError, match="stitch mode"):
        Stitcher(grid, 64, 64, 32, lambda y0, rows: None, mode="avg")


def test_glass_gaps_do_not_grow_the_band():
    """Tissue tiles far apart (a sparse grid): rows between them are flushed, the band stays two tiles high."""
    h, w, tile, o = 4000, 200, 64, 16
    grid = regular_grid(w, h, tile, o)
    keep = ((grid[:, 1] > 1800) & (grid[:, 1] < 2000)) | (grid[:, 1] > 3700)  # nothing near the top
    st = Stitcher(grid[keep], w, h, tile, lambda y0, rows: None, mode="blend")
    for i in range(int(keep.sum())):
        st.add(i, np.full((tile, tile), 5, np.uint8))
    st.close()
    assert st.peak_band_rows <= 2 * tile
