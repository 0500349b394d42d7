"""TileStream: regions match a whole-canvas oracle in any push order, come out as soon as their tiles are done."""
import numpy as np
import pytest

from fastgicn.engine.streaming import TileStream
from fastgicn.errors import ConfigError


def fake_predict(tiles: np.ndarray) -> np.ndarray:
    """Tile-dependent probabilities (pixel red channel mixed with the tile mean), so overlaps disagree and the
    averaging is really exercised."""
    x = tiles.astype(np.float32) / 255.0
    p1 = 0.6 * x[..., 0] + 0.4 * x.mean(axis=(1, 2, 3))[:, None, None]
    return np.stack([1.0 - p1, p1], axis=1).astype(np.float32)


def oracle(image, tile, stride, skipped=()):
    """Sum of probabilities and counts over the whole canvas, tile by tile (the slow obvious way)."""
    h, w = image.shape[:2]
    n_rows = 1 if h <= tile else -(-(h - tile) // stride) + 1
    n_cols = 1 if w <= tile else -(-(w - tile) // stride) + 1
    total = np.zeros((2, h, w), np.float32)
    count = np.zeros((h, w), np.int32)
    for r in range(n_rows):
        for c in range(n_cols):
            if (c, r) in skipped:
                continue
            y, x = r * stride, c * stride
            t = np.zeros((tile, tile, 3), np.uint8)
            crop = image[y:y + tile, x:x + tile]
            t[:crop.shape[0], :crop.shape[1]] = crop
            p = fake_predict(t[None])[0]
            hh, ww = min(tile, h - y), min(tile, w - x)
            total[:, y:y + hh, x:x + ww] += p[:, :hh, :ww]
            count[y:y + hh, x:x + ww] += 1
    probs = total / np.maximum(count, 1)
    probs[0][count == 0] = 1.0
    return probs, count


def tiles_of(image, stream, downsample=1):
    t = stream.tile_size
    for l0_x, l0_y in stream.tile_positions():
        x, y = l0_x // downsample, l0_y // downsample
        tile = np.zeros((t, t, 3), np.uint8)
        crop = image[y:y + t, x:x + t]
        tile[:crop.shape[0], :crop.shape[1]] = crop
        yield tile, int(l0_x), int(l0_y)


def assemble(regions, shape):
    probs = np.full((2,) + shape, np.nan, np.float32)
    labels = np.full(shape, 255, np.uint8)
    cover = np.zeros(shape, np.int32)
    seen = np.zeros(shape, np.int32)
    for reg in regions:
        sl = (slice(reg.lvl_y, reg.lvl_y + reg.height), slice(reg.lvl_x, reg.lvl_x + reg.width))
        probs[(slice(None),) + sl] = reg.probabilities
        labels[sl] = reg.labels
        cover[sl] = reg.coverage
        seen[sl] += 1
    return probs, labels, cover, seen


@pytest.mark.parametrize("height,width,overlap,batch", [(200, 150, 0, 3), (200, 150, 16, 4), (64, 64, 8, 2),
                                                        (50, 230, 32, 5)])
def test_regions_match_the_canvas_oracle_in_any_order(height, width, overlap, batch):
    rng = np.random.default_rng(height + width + overlap)
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    stream = TileStream(fake_predict, width=width, height=height, tile_size=64, overlap=overlap,
                        batch_size=batch)
    tiles = list(tiles_of(image, stream))
    regions = []
    for i in rng.permutation(len(tiles)):
        regions += stream.push(*tiles[i])
    regions += stream.close()
    assert stream.done and len(regions) == stream.n_rows * stream.n_cols
    probs, labels, cover, seen = assemble(regions, (height, width))
    assert (seen == 1).all(), "regions must tile the area exactly once"
    ref, ref_count = oracle(image, 64, 64 - overlap)
    np.testing.assert_allclose(probs, ref, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(cover, ref_count)
    np.testing.assert_array_equal(labels, ref.argmax(0))


def test_row_major_scan_hands_back_each_region_as_soon_as_its_tile_is_done():
    image = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    stream = TileStream(fake_predict, width=256, height=256, tile_size=64, overlap=16, batch_size=1)
    for tile, x, y in tiles_of(image, stream):
        out = stream.push(tile, x, y)
        c, r = x // stream.stride, y // stream.stride
        # region (c, r) waits only for tiles scanned before it (left, above): finished right away
        assert [(reg.t_col, reg.t_row) for reg in out] == [(c, r)]
    assert stream.done
    # with overlap, only the regions touched by done tiles but missing a tile are held: about one row
    assert stream.max_buffered_regions <= 2 * stream.n_cols + 2


def test_a_region_waits_for_every_overlapping_tile():
    image = np.zeros((128, 128, 3), np.uint8) + 100
    stream = TileStream(fake_predict, width=128, height=128, tile_size=64, overlap=16, batch_size=1)
    tiles = {(x, y): t for t, x, y in tiles_of(image, stream)}
    s = stream.stride
    # region (1, 1) needs tiles (0,0), (1,0), (0,1), (1,1); push (1,1) first: nothing may come out
    assert stream.push(tiles[(s, s)], s, s) == []
    assert stream.push(tiles[(0, s)], 0, s) == []
    assert stream.push(tiles[(s, 0)], s, 0) == []
    out = stream.push(tiles[(0, 0)], 0, 0)
    assert sorted((r.t_col, r.t_row) for r in out) == [(0, 0), (0, 1), (1, 0), (1, 1)]


def test_skipped_tiles_finish_regions_and_read_as_background():
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (192, 192, 3), dtype=np.uint8)
    stream = TileStream(fake_predict, width=192, height=192, tile_size=64, overlap=0, batch_size=2)
    skipped = {(1, 1), (2, 0)}
    regions = []
    for tile, x, y in tiles_of(image, stream):
        c, r = x // 64, y // 64
        if (c, r) in skipped:
            out = stream.skip(x, y)
            assert [(reg.t_col, reg.t_row) for reg in out] == [(c, r)]  # nothing else needed it
            assert (out[0].coverage == 0).all() and (out[0].labels == 0).all()
            assert (out[0].probabilities[0] == 1).all()
            regions += out
        else:
            regions += stream.push(tile, x, y)
    regions += stream.close()
    probs, _, cover, seen = assemble(regions, (192, 192))
    ref, ref_count = oracle(image, 64, 64, skipped)
    assert (seen == 1).all()
    np.testing.assert_allclose(probs, ref, atol=1e-6)
    np.testing.assert_array_equal(cover, ref_count)


def test_close_counts_unseen_tiles_as_skipped():
    stream = TileStream(fake_predict, width=130, height=64, tile_size=64, batch_size=8)
    tile = np.full((64, 64, 3), 200, np.uint8)
    assert stream.push(tile, 0, 0) == []       # batch not full yet
    regions = stream.close()
    assert sorted(r.t_col for r in regions) == [0, 1, 2]
    last = max(regions, key=lambda r: r.t_col)
    assert last.width == 130 - 2 * 64 and (last.coverage == 0).all()
    with pytest.raises(ConfigError, match="closed"):
        stream.push(tile, 64, 0)


def test_downsample_maps_level0_positions_to_read_level_regions():
    rng = np.random.default_rng(5)
    lvl = rng.integers(0, 256, (100, 140, 3), dtype=np.uint8)
    stream = TileStream(fake_predict, width=280, height=200, tile_size=64, overlap=8, downsample=2,
                        batch_size=3)
    assert stream.tile_positions()[1].tolist() == [2 * 56, 0]
    regions = []
    for tile, x, y in tiles_of(lvl, stream, downsample=2):
        regions += stream.push(tile, x, y)
    regions += stream.close()
    probs, _, _, seen = assemble(regions, (100, 140))
    assert (seen == 1).all()
    np.testing.assert_allclose(probs, oracle(lvl, 64, 56)[0], atol=1e-6)
    assert regions[0].l0_x == 2 * regions[0].lvl_x


@pytest.mark.parametrize("call,match", [
    (lambda s, t: s.push(t, 10, 0), "off the grid"),
    (lambda s, t: s.push(t, 64 * 9, 0), "outside"),
    (lambda s, t: s.push(t[:32], 0, 0), "expected uint8 64 x 64 x 3"),
    (lambda s, t: s.push(t.astype(np.float32), 0, 0), "expected uint8"),
])
def test_bad_pushes_raise_config_errors(call, match):
    stream = TileStream(fake_predict, width=256, height=256, tile_size=64, batch_size=4)
    with pytest.raises(ConfigError, match=match):
        call(stream, np.zeros((64, 64, 3), np.uint8))


def test_duplicate_tiles_and_bad_geometry_raise():
    stream = TileStream(fake_predict, width=256, height=256, tile_size=64, batch_size=4)
    tile = np.zeros((64, 64, 3), np.uint8)
    stream.push(tile, 0, 0)
    with pytest.raises(ConfigError, match="already"):
        stream.push(tile, 0, 0)
    with pytest.raises(ConfigError, match="already"):
        stream.skip(0, 0)
    with pytest.raises(ConfigError, match="overlap"):
        TileStream(fake_predict, width=256, height=256, tile_size=64, overlap=40)
    with pytest.raises(ConfigError, match="width"):
        TileStream(fake_predict, width=0, height=256, tile_size=64)


def test_predict_returning_the_wrong_shape_is_reported():
    stream = TileStream(lambda t: np.zeros((len(t), 3, 64, 64), np.float32), width=64, height=64, tile_size=64,
                        batch_size=1)
    with pytest.raises(ConfigError, match="predict returned shape"):
        stream.push(np.zeros((64, 64, 3), np.uint8), 0, 0)
