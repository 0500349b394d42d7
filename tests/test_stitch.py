"""Stitcher geometry: with a purely local model, stitching any tiling equals running it on the whole image."""
import numpy as np
import pytest
from scipy import ndimage

from fastgicn.errors import ConfigError
from fastgicn.tiling.stitch import Stitcher, ramp, stitch_to_array


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


# -- add_batch: the batch path against per-tile add and against an independent NumPy reference ---------------
def fixed_ramp_reference(o):
    """The documented 8.8 ramp, written out: floor(256 * clip((d + 1/2 - o/4) / (o/2), 0, 1) + 1/2) for the
    tile on the left (d: distance from its right edge), the right half mirrored to sum to 256."""
    r = [int(np.floor(256 * min(1.0, max(0.0, (o - 1 - k + 0.5 - o / 4) / (o / 2))) + 0.5)) for k in range(o)]
    for k in range(o // 2):
        r[o - 1 - k] = 256 - r[k]
    return np.array(r, np.int64)


def reference_stitch(grid, w, h, tile, preds, mode):
    """Whole-image NumPy version of the documented formulas (no band, no batches): crop gives each pixel to
    the tile whose kept cell (overlaps split in the middle) holds it; blend is min((sum p * W + 128) >> 8, 255)
    with W the 8.8 product of the tiles' 1-D ramps, rounded half up or (one-sided corners) half down."""
    def axis(starts):
        uniq = sorted(set(starts))
        info = {}
        for k, s in enumerate(uniq):
            lo = max(0, uniq[k - 1] + tile - s) if k else 0
            hi = max(0, s + tile - uniq[k + 1]) if k + 1 < len(uniq) else 0
            info[s] = (lo, hi, s + lo // 2 if lo else s, uniq[k + 1] + hi // 2 if hi else s + tile)
        return info

    ax, ay = axis(grid[:, 0].tolist()), axis(grid[:, 1].tolist())
    W = 2 * tile + w + h
    if mode == "crop":
        out = np.zeros((h + W, w + W), np.int64)
        for (x, y), p in zip(grid.tolist(), preds):
            if p is None:
                continue
            x0, x1, y0, y1 = ax[x][2], ax[x][3], ay[y][2], ay[y][3]
            out[y0:y1, x0:x1] = p[y0 - y:y1 - y, x0 - x:x1 - x]
        return out[:h, :w].astype(np.uint8)
    acc = np.zeros((h + W, w + W), np.int64)
    for (x, y), p in zip(grid.tolist(), preds):
        if p is None:
            continue

        def weights(lo, hi):
            v = np.full(tile, 256, np.int64)
            if lo:
                v[:lo] = np.minimum(v[:lo], fixed_ramp_reference(lo)[::-1])
            if hi:
                v[tile - hi:] = np.minimum(v[tile - hi:], fixed_ramp_reference(hi))
            return v

        u, v = weights(*ax[x][:2]), weights(*ay[y][:2])
        ii, jj = np.meshgrid(np.arange(tile), np.arange(tile), indexing="ij")
        half = np.where((ii < ay[y][0]) != (jj < ax[x][0]), 127, 128)
        acc[y:y + tile, x:x + tile] += p.astype(np.int64) * ((v[:, None] * u[None, :] + half) >> 8)
    return np.minimum((acc[:h, :w] + 128) >> 8, 255).astype(np.uint8)


def feed_batches(grid, w, h, tile, preds, mode, order, sizes, via="add_batch"):
    out = np.zeros((h, w), np.uint8)
    flushed = []

    def sink(y0, rows):
        assert not flushed or flushed[-1] == y0  # in order, once
        flushed.append(y0 + len(rows))
        out[y0:y0 + len(rows)] = rows

    st = Stitcher(grid, w, h, tile, sink, mode=mode)
    k = 0
    for n in sizes:
        chunk = order[k:k + n]
        k += n
        if via == "add":
            for i in chunk:
                st.skip(i) if preds[i] is None else st.add(i, preds[i])
            continue
        keep = [i for i in chunk if preds[i] is not None]
        st.skip_batch(np.array([i for i in chunk if preds[i] is None], np.int64))
        st.add_batch(np.array(keep, np.int64), np.stack([preds[i] for i in keep]) if keep
                     else np.zeros((0, tile, tile), np.uint8))
    st.close()
    assert st.band_bytes == 0 and st.peak_band_rows <= 2 * tile and flushed[-1] == h
    return out, st


def batch_sizes(n, rng):
    sizes = []
    while sum(sizes) < n:
        sizes.append(int(rng.integers(1, 9)))
    return sizes


# (height, width, tile, overlap): odd grids whose last tiles run past the image, overlaps odd and even
BATCH_CASES = [(100, 130, 32, 0), (97, 61, 32, 8), (45, 200, 40, 16), (150, 90, 48, 24), (77, 83, 32, 7),
               (20, 17, 32, 2), (130, 130, 32, 13)]


@pytest.mark.parametrize("mode", ["crop", "blend"])
@pytest.mark.parametrize("h,w,tile,overlap", BATCH_CASES)
def test_add_batch_equals_add_and_the_numpy_reference(mode, h, w, tile, overlap):
    rng = np.random.default_rng(h * 7 + w + overlap)
    grid = regular_grid(w, h, tile, overlap)
    preds = [rng.integers(0, 256, (tile, tile), dtype=np.uint8) for _ in grid]
    for i in rng.choice(len(grid), size=len(grid) // 4, replace=False):
        preds[i] = None  # skipped (glass)
    ref = reference_stitch(grid, w, h, tile, preds, mode)
    for order in (np.arange(len(grid)), rng.permutation(len(grid)), np.arange(len(grid))[::-1]):
        sizes = batch_sizes(len(grid), rng)
        batched, _ = feed_batches(grid, w, h, tile, preds, mode, order.tolist(), sizes)
        single, _ = feed_batches(grid, w, h, tile, preds, mode, order.tolist(), sizes, via="add")
        np.testing.assert_array_equal(batched, ref)
        np.testing.assert_array_equal(single, ref)


@pytest.mark.parametrize("h,w,tile,overlap", BATCH_CASES)
def test_fixed_point_blend_weights_are_an_exact_partition_of_unity(h, w, tile, overlap):
    grid = regular_grid(w, h, tile, overlap)
    ones = [np.full((tile, tile), 255, np.uint8)] * len(grid)
    out, st = feed_batches(grid, w, h, tile, ones, "blend", list(range(len(grid))), [len(grid)])
    assert (out == 255).all()  # 255 * sum(W) == 255 * 256 everywhere, no overflow
    if not st.plain:
        total = np.zeros((h + tile, w + tile), np.int64)
        for (x, y), k in zip(grid.tolist(), st._wid.tolist()):
            total[y:y + tile, x:x + tile] += st._weights[k]
        assert (total[:h, :w] == 256).all()
    for o in range(1, 65):
        np.testing.assert_array_equal(fixed_ramp_reference(o) + fixed_ramp_reference(o)[::-1], 256)


def test_overlap_zero_blend_is_a_plain_copy():
    grid = regular_grid(96, 64, 32, 0)
    st = Stitcher(grid, 96, 64, 32, lambda y0, rows: None, mode="blend")
    assert st.plain and st.band_bytes == 64 * 96  # uint8 band, no weights
    assert not Stitcher(regular_grid(96, 64, 32, 8), 96, 64, 32, lambda y0, r: None, mode="blend").plain


def test_out_of_order_batches_wait_aside_then_land():
    h, w, tile, o = 400, 100, 32, 8
    grid = regular_grid(w, h, tile, o)
    rng = np.random.default_rng(1)
    preds = [rng.integers(0, 256, (tile, tile), dtype=np.uint8) for _ in grid]
    order = list(range(len(grid)))[::-1]  # bottom first: everything waits for the top row
    for mode in ("crop", "blend"):
        out, st = feed_batches(grid, w, h, tile, preds, mode, order, [5] * (len(grid) // 5 + 1))
        np.testing.assert_array_equal(out, reference_stitch(grid, w, h, tile, preds, mode))
        assert st.peak_deferred > len(grid) // 2 and not st._deferred and st.peak_band_rows == 2 * tile


def test_stitching_from_another_thread_gives_the_same_rows():
    import threading

    h, w, tile, o = 150, 90, 48, 24
    grid = regular_grid(w, h, tile, o)
    rng = np.random.default_rng(2)
    preds = [rng.integers(0, 256, (tile, tile), dtype=np.uint8) for _ in grid]
    result = {}
    th = threading.Thread(target=lambda: result.update(out=feed_batches(
        grid, w, h, tile, preds, "blend", list(range(len(grid))), [4] * len(grid))[0]))
    th.start()
    th.join()
    np.testing.assert_array_equal(result["out"], reference_stitch(grid, w, h, tile, preds, "blend"))


def test_batch_errors_name_the_tile():
    grid = regular_grid(64, 64, 32, 0)
    st = Stitcher(grid, 64, 64, 32, lambda y0, rows: None)
    z = np.zeros((2, 32, 32), np.uint8)
    with pytest.raises(ConfigError, match="tile 1 .* already"):
        st.add_batch([1, 1], z)
    with pytest.raises(ConfigError, match="uint8 probabilities of shape \\(2, 32, 32\\)"):
        st.add_batch([0, 1], z.astype(np.float32))
    with pytest.raises(ConfigError, match="outside the grid"):
        st.skip_batch([4])
    st.add_batch([0, 1], z)
    with pytest.raises(ConfigError, match="tile 0 .* already"):
        st.skip_batch([2, 0])
    assert not st._done[2]  # a refused batch changes nothing
