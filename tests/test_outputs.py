"""Output writers: streamed pyramidal TIFF read back by OpenSlide, exact polygons, block means, atomic files."""
import json
import os

import numpy as np
import openslide
import pytest
from PIL import Image, ImageDraw
from scipy import ndimage

from fastgicn.errors import ConfigError, SlideError
from fastgicn.slide.outputs import (LowRes, PyramidBandWriter, atomic_path, geojson_features, lowres_factor,
                                    mask_to_polygons, overlay_image, remove_partials, ring_area, write_geojson,
                                    write_json)


def even_odd_fill(polygons, shape):
    """Independent rasteriser: a pixel is inside when a ray from its centre to the right crosses an odd number
    of ring edges (only vertical edges can cross a horizontal ray through a pixel centre)."""
    out = np.zeros(shape, bool)
    for rings in polygons:
        inside = np.zeros(shape, bool)
        for ring in rings:
            closed = np.vstack([ring, ring[:1]])
            for (x0, y0), (x1, y1) in zip(closed[:-1], closed[1:]):
                assert x0 == x1 or y0 == y1, "edges run along pixel edges"
                if x0 == x1 and y0 != y1:
                    lo, hi = sorted((y0, y1))
                    inside[lo:hi, :x0] ^= True  # centres left of the edge, rows it spans
        out |= inside
    return out


def random_mask(h, w, seed, density=0.5, smooth=2.0):
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.random((h, w)), smooth)
    return field > np.quantile(field, 1 - density)


MASKS = {
    "blobs": random_mask(60, 80, 0),
    "noise": np.random.default_rng(1).random((37, 41)) > 0.5,  # many saddles (diagonal neighbours)
    "ring_with_island": np.pad(np.pad(np.pad(np.ones((3, 3), bool), 2), 2, constant_values=True), 3),
    "checker": (np.indices((9, 9)).sum(0) % 2).astype(bool),
    "full": np.ones((7, 5), bool),
    "border_touching": random_mask(50, 30, 7, density=0.7),
    "empty": np.zeros((10, 10), bool),
    "single_pixel": np.pad(np.ones((1, 1), bool), ((4, 0), (0, 3))),
}


@pytest.mark.parametrize("name", sorted(MASKS))
def test_polygons_fill_back_to_exactly_the_mask(name):
    mask = MASKS[name]
    polygons = mask_to_polygons(mask)
    np.testing.assert_array_equal(even_odd_fill(polygons, mask.shape), mask)
    _, count = ndimage.label(mask)
    assert len(polygons) == count  # one polygon per 4-connected region
    for rings in polygons:
        assert ring_area(rings[0]) > 0 and all(ring_area(r) < 0 for r in rings[1:])
    area = sum(sum(ring_area(r) for r in rings) for rings in polygons)
    assert area == mask.sum()


def test_holes_belong_to_their_region():
    polygons = mask_to_polygons(MASKS["ring_with_island"])
    assert sorted(len(p) for p in polygons) == [1, 2]  # the island, and the ring with its hole


def test_min_pixels_drops_small_regions():
    mask = np.zeros((20, 20), bool)
    mask[1:3, 1:3] = True
    mask[10:18, 10:18] = True
    polygons = mask_to_polygons(mask, min_pixels=5)
    assert len(polygons) == 1 and ring_area(polygons[0][0]) == 64


def test_geojson_is_qupath_annotations_in_level0_coordinates_and_rasterises_back(tmp_path):
    mask = random_mask(64, 48, 3, density=0.3)
    scale = 8  # level-0 pixels per mask pixel
    coll = geojson_features(mask_to_polygons(mask), scale, mpp=0.25)
    path = write_geojson(tmp_path / "t.geojson", coll)
    data = json.loads(path.read_text())
    assert data["type"] == "FeatureCollection" and data["features"]
    img = Image.new("L", (48 * scale, 64 * scale), 0)
    draw = ImageDraw.Draw(img)
    for f in data["features"]:
        assert f["type"] == "Feature" and f["geometry"]["type"] == "Polygon"
        props = f["properties"]
        assert props["objectType"] == "annotation"
        assert props["classification"]["name"] == "Tumor" and len(props["classification"]["color"]) == 3
        rings = f["geometry"]["coordinates"]
        assert all(r[0] == r[-1] for r in rings)  # closed
        exterior_area = ring_area(np.array(rings[0][:-1], float)) + sum(
            ring_area(np.array(r[:-1], float)) for r in rings[1:])
        assert props["measurements"]["Area µm^2"] == pytest.approx(exterior_area * 0.25 ** 2, abs=0.01)
        # pixel-corner coordinates -> PIL pixel centres: shift by half a pixel
        draw.polygon([(x - 0.5, y - 0.5) for x, y in rings[0]], fill=255)
        for hole in rings[1:]:
            draw.polygon([(x - 0.5, y - 0.5) for x, y in hole], fill=0)
    raster = np.asarray(img) > 0
    full = np.kron(mask, np.ones((scale, scale), bool))
    # PIL's fill convention differs from ours at the outline only: agree within one level-0 pixel
    square = np.ones((3, 3), bool)
    assert (raster <= ndimage.binary_dilation(full, square)).all()
    assert (ndimage.binary_erosion(full, square) <= raster).all()
    assert (raster != full).mean() < 0.02


def test_geojson_clips_partial_edge_blocks():
    mask = np.ones((3, 3), bool)
    coll = geojson_features(mask_to_polygons(mask), 10, clip=(25, 28))
    xs = [p[0] for p in coll["features"][0]["geometry"]["coordinates"][0]]
    ys = [p[1] for p in coll["features"][0]["geometry"]["coordinates"][0]]
    assert max(xs) == 25 and max(ys) == 28


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
    wr = PyramidBandWriter(tmp_path / "missing" / "p.tif", 300, 300, tile=64)
    with pytest.raises(SlideError, match="does not exist"):
        for y in range(0, 300, 64):
            wr.write_rows(y, np.zeros((min(64, 300 - y), 300), np.uint8))
        wr.close()


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
    assert (out[10, 10] != 240).any() and out[10, 10, 0] > out[10, 10, 1]
    assert tuple(out[5, 10]) == (200, 0, 0)  # outline
    with pytest.raises(ConfigError):
        overlay_image(thumb, mask[:10])
    assert not os.environ.get("NEVER")
