"""TileStream: the pipeline's stitcher under a push API. Regions equal the stitcher (and segment_slide) on the
same tile predictions in any push order, and come out as soon as no tile still to come can touch them."""
import numpy as np
import pytest
import torch
from test_pipeline import LocalModel, read_tiff, tissue_image

from fastgicn.config import TileConfig
from fastgicn.engine.streaming import TileStream
from fastgicn.errors import ConfigError
from fastgicn.tiling.stitch import stitch_to_array


def fake_predict(tiles: np.ndarray) -> np.ndarray:
    """Tile-dependent probabilities (pixel red channel mixed with the tile mean), so overlaps disagree and the
    stitching is really exercised."""
    x = tiles.astype(np.float32) / 255.0
    p1 = 0.6 * x[..., 0] + 0.4 * x.mean(axis=(1, 2, 3))[:, None, None]
    return np.stack([1.0 - p1, p1], axis=1).astype(np.float32)


def as_uint8(probs):
    return np.rint(probs[:, 1] * np.float32(255)).astype(np.uint8)


def tiles_of(image, stream, downsample=1, fill=0):
    t = stream.tile_size
    for l0_x, l0_y in stream.tile_positions():
        x, y = l0_x // downsample, l0_y // downsample
        tile = np.full((t, t, 3), fill, np.uint8)
        crop = image[y:y + t, x:x + t]
        tile[:crop.shape[0], :crop.shape[1]] = crop
        yield tile, int(l0_x), int(l0_y)


def stitcher_oracle(image, stream, skipped=(), downsample=1, fill=0):
    """The same tile predictions through stitch_to_array (the pipeline's stitcher, all at once)."""
    grid = stream.tile_positions() // downsample
    preds = []
    for tile, x, y in tiles_of(image, stream, downsample, fill):
        c, r = x // (stream.stride * downsample), y // (stream.stride * downsample)
        preds.append(None if (c, r) in skipped else as_uint8(fake_predict(tile[None]))[0])
    return stitch_to_array(grid, stream.lvl_width, stream.lvl_height, stream.tile_size, preds, mode=stream.stitch)


def assemble(regions, shape):
    prob = np.zeros(shape, np.uint8)
    labels = np.full(shape, 255, np.uint8)
    cover = np.zeros(shape, np.int32)
    seen = np.zeros(shape, np.int32)
    y = 0
    for reg in regions:
        assert reg.lvl_x == 0 and reg.width == shape[1] and reg.lvl_y == y  # bands of whole rows, in order
        y += reg.height
        sl = (slice(reg.lvl_y, reg.lvl_y + reg.height), slice(reg.lvl_x, reg.lvl_x + reg.width))
        assert reg.probability.dtype == np.uint8
        prob[sl] = reg.probability
        labels[sl] = reg.labels
        cover[sl] = reg.coverage
        seen[sl] += 1
    return prob, labels, cover, seen


@pytest.mark.parametrize("stitch", ["blend", "crop"])
@pytest.mark.parametrize("height,width,overlap,batch", [(200, 150, 0, 3), (200, 150, 16, 4), (64, 64, 8, 2),
                                                        (50, 230, 32, 5), (131, 97, 13, 3)])
def test_regions_equal_the_stitcher_in_any_order(height, width, overlap, batch, stitch):
    rng = np.random.default_rng(height + width + overlap)
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    stream = TileStream(fake_predict, width=width, height=height, tile_size=64, overlap=overlap,
                        batch_size=batch, stitch=stitch)
    tiles = list(tiles_of(image, stream))
    regions = []
    for i in rng.permutation(len(tiles)):
        regions += stream.push(*tiles[i])
    regions += stream.close()
    assert stream.done
    prob, labels, cover, seen = assemble(regions, (height, width))
    assert (seen == 1).all(), "regions must tile the area exactly once"
    ref = stitcher_oracle(image, stream)
    np.testing.assert_array_equal(prob, ref)
    np.testing.assert_array_equal(labels, ref >= 128)
    assert cover.min() >= 1 and (cover.max() == 1) == (stitch == "crop" or overlap == 0 or len(tiles) == 1)
    fp = regions[0].probabilities  # the float view for callers of the earlier API
    assert fp.dtype == np.float32 and fp.shape == (2, regions[0].height, width)
    np.testing.assert_allclose(fp.sum(0), 1, atol=1e-6)
    np.testing.assert_allclose(fp[1], regions[0].probability / 255, atol=1e-6)


def test_uint8_predictions_go_straight_to_the_stitcher():
    image = np.random.default_rng(1).integers(0, 256, (100, 120, 3), dtype=np.uint8)
    streams = [TileStream(p, width=120, height=100, tile_size=64, overlap=16, batch_size=3)
               for p in (fake_predict, lambda t: as_uint8(fake_predict(t)))]
    maps = []
    for stream in streams:
        regions = []
        for tile, x, y in tiles_of(image, stream):
            regions += stream.push(tile, x, y)
        maps.append(assemble(regions + stream.close(), (100, 120))[0])
    np.testing.assert_array_equal(*maps)


@pytest.mark.parametrize("stitch", ["blend", "crop"])
def test_row_major_scan_hands_back_each_band_as_its_row_of_tiles_is_done(stitch):
    image = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    stream = TileStream(fake_predict, width=256, height=256, tile_size=64, overlap=16, batch_size=1,
                        stitch=stitch)
    s, margin = stream.stride, (16 // 2 if stitch == "crop" else 0)
    y = 0
    for tile, x, yy in tiles_of(image, stream):
        out = stream.push(tile, x, yy)
        c, r = x // s, yy // s
        if c < stream.n_cols - 1:
            assert out == []  # a band waits for its whole row of tiles
        else:  # the row is done: every row above the next tile row's first (or the last row) is final
            end = 256 if r == stream.n_rows - 1 else (r + 1) * s + margin
            assert [(reg.lvl_y, reg.height) for reg in out] == [(y, end - y)]
            y = end
    assert y == 256 and stream.done and stream.close() == []
    assert stream.peak_deferred_tiles == 0 and stream.band_bytes == 0  # nothing held aside; band released


def test_a_band_waits_for_every_tile_that_touches_it():
    image = np.zeros((112, 112, 3), np.uint8) + 100
    stream = TileStream(fake_predict, width=112, height=112, tile_size=64, overlap=16, batch_size=1)
    assert stream.grid_shape == (2, 2)
    tiles = {(x, y): t for t, x, y in tiles_of(image, stream)}
    s = stream.stride
    assert stream.push(tiles[(s, s)], s, s) == []
    assert stream.push(tiles[(0, s)], 0, s) == []
    assert stream.push(tiles[(s, 0)], s, 0) == []
    out = stream.push(tiles[(0, 0)], 0, 0)  # the last tile that touches any row: all of it comes out
    assert [(r.lvl_y, r.height) for r in out] == [(0, 112)]


def test_skipped_tiles_finish_regions_and_read_as_background():
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (192, 192, 3), dtype=np.uint8)
    stream = TileStream(fake_predict, width=192, height=192, tile_size=64, overlap=0, batch_size=2)
    skipped = {(1, 1), (2, 0)}
    regions = []
    for tile, x, y in tiles_of(image, stream):
        c, r = x // 64, y // 64
        regions += stream.skip(x, y) if (c, r) in skipped else stream.push(tile, x, y)
    regions += stream.close()
    prob, labels, cover, seen = assemble(regions, (192, 192))
    assert (seen == 1).all()
    np.testing.assert_array_equal(prob, stitcher_oracle(image, stream, skipped))
    for c, r in skipped:
        cell = (slice(r * 64, r * 64 + 64), slice(c * 64, c * 64 + 64))
        assert (cover[cell] == 0).all() and (prob[cell] == 0).all() and (labels[cell] == 0).all()
    assert cover.sum() == 7 * 64 * 64


def test_close_counts_unseen_tiles_as_skipped():
    stream = TileStream(fake_predict, width=130, height=64, tile_size=64, batch_size=8)
    tile = np.full((64, 64, 3), 200, np.uint8)
    assert stream.push(tile, 0, 0) == []       # batch not full yet
    regions = stream.close()
    assert [(r.lvl_y, r.height, r.width) for r in regions] == [(0, 64, 130)]
    cover = regions[0].coverage
    assert (cover[:, :64] == 1).all() and (cover[:, 64:] == 0).all() and (regions[0].probability[:, 64:] == 0).all()
    assert stream.close() == []
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
    prob, _, _, seen = assemble(regions, (100, 140))
    assert (seen == 1).all()
    np.testing.assert_array_equal(prob, stitcher_oracle(lvl, stream, downsample=2))
    assert regions[1].l0_y == 2 * regions[1].lvl_y


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("stitch", ["crop", "blend"])
def test_stream_equals_segment_slide_on_the_same_tiles(tmp_path, stitch):
    """The streaming API and the whole-slide pipeline stitch the same model's tiles to the same map."""
    from fastgicn.models.preprocess import to_model_input
    from fastgicn.pipeline import segment_slide

    h, w, tile, overlap = 211, 300, 64, 8
    img = tissue_image(h, w)
    model = LocalModel()
    config = TileConfig(tile_size=tile, overlap=overlap, batch_size=3, tissue_prefilter=False,
                        min_tissue_fraction=0.0)
    res = segment_slide(img, tmp_path, model, config, name="arr", mpp=0.5, stitch=stitch, threads=1,
                        progress=False, min_region_um2=0)
    _, expected = read_tiff(res.outputs["probability"])

    def predict(tiles):  # the pipeline's arithmetic: normalise, forward, softmax, x 255, round, uint8
        with torch.inference_mode():
            x = to_model_input(torch.from_numpy(tiles), model.mean, model.std)
            p = torch.softmax(model(x).float(), dim=1)[:, 1]
            return p.mul_(255.0).round_().to(torch.uint8).numpy()

    stream = TileStream(predict, width=w, height=h, tile_size=tile, overlap=overlap, batch_size=3,
                        stitch=stitch)
    regions = []
    for t, x, y in tiles_of(img, stream, fill=255):  # the reader pads past the edge with white
        regions += stream.push(t, x, y)
    prob, labels, _, _ = assemble(regions + stream.close(), (h, w))
    diff = np.abs(prob.astype(int) - expected)
    assert diff.max() <= 1 and (diff == 0).mean() > 0.999  # equal up to float rounding of the softmax
    _, mask = read_tiff(res.outputs["mask"])
    assert ((labels * 255) != mask).mean() < 1e-3


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
    with pytest.raises(ConfigError, match="predict returned"):
        stream.push(np.zeros((64, 64, 3), np.uint8), 0, 0)
