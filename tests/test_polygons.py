"""Tumour polygons (OpenCV contours -> valid shapely polygons, strips on threads, specks) and their QuPath
GeoJSON, against independent rasterisers, GEOS and hand-built masks."""
import json
import uuid

import numpy as np
import pytest
import shapely
from scipy import ndimage
from shapely.geometry import MultiPolygon, Polygon, shape

from fastgicn.errors import ConfigError
from fastgicn.outputs.geojson import geojson_features, tumour_geojson, write_geojson
from fastgicn.outputs.polygons import mask_to_polygons, min_region_area

EIGHT = np.ones((3, 3), bool)  # 8-connectivity: OpenCV's regions


def polygon_parts(geom):
    return list(geom.geoms) if isinstance(geom, MultiPolygon) else [geom]


def even_odd_fill(ring_lists, shape_hw):
    """Independent rasteriser: a pixel is inside when a ray from its centre to the right crosses an odd number
    of ring edges (only vertical edges can cross a horizontal ray through a pixel centre). `ring_lists`: for
    each polygon, its rings as (k, 2) vertex arrays (closed or not), every edge along pixel edges."""
    out = np.zeros(shape_hw, bool)
    for rings in ring_lists:
        inside = np.zeros(shape_hw, bool)
        for ring in rings:
            ring = np.asarray(ring)
            closed = np.vstack([ring, ring[:1]])
            for (x0, y0), (x1, y1) in zip(closed[:-1], closed[1:]):
                assert x0 == x1 or y0 == y1, "edges run along pixel edges"
                if x0 == x1 and y0 != y1:
                    lo, hi = sorted((int(y0), int(y1)))
                    inside[lo:hi, :int(x0)] ^= True  # centres left of the edge, rows it spans
        out |= inside
    return out


def fill_features(features, shape_hw, scale=1):
    """The GeoJSON features back to a mask (pixel-corner coordinates / scale), by even-odd ray crossing."""
    ring_lists = []
    for f in features:
        g = f["geometry"]
        polys = [g["coordinates"]] if g["type"] == "Polygon" else g["coordinates"]
        ring_lists += [[np.array(r, float) / scale for r in rings] for rings in polys]
    return even_odd_fill(ring_lists, shape_hw)


def centres_inside(geoms, shape_hw):
    """Second independent rasteriser: GEOS point-in-polygon at every pixel centre."""
    yy, xx = np.mgrid[:shape_hw[0], :shape_hw[1]]
    out = np.zeros(shape_hw, bool)
    for g in geoms:
        out |= shapely.contains_xy(g, xx + 0.5, yy + 0.5)
    return out


def random_mask(h, w, seed, density=0.5, smooth=2.0):
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.random((h, w)), smooth)
    return field > np.quantile(field, 1 - density)


def square_with_hole():
    m = np.zeros((12, 12), bool)
    m[2:10, 2:10] = True
    m[4:8, 4:8] = False
    return m


def nested_rings():
    """A ring, inside its hole another ring, inside that one's hole an island (3 regions, 2 holes)."""
    m = np.zeros((17, 17), bool)
    m[1:16, 1:16] = True
    m[3:14, 3:14] = False
    m[5:12, 5:12] = True
    m[7:10, 7:10] = False
    m[8, 8] = True
    return m


def diagonal_pair():
    m = np.zeros((4, 4), bool)
    m[1, 1] = m[2, 2] = True
    return m


MASKS = {
    "square_with_hole": square_with_hole(),
    "nested_rings": nested_rings(),
    "diagonal_pair": diagonal_pair(),
    "line_horizontal": np.pad(np.ones((1, 9), bool), 2),
    "line_vertical": np.pad(np.ones((7, 1), bool), ((0, 3), (1, 1))),
    "line_diagonal": np.eye(8, dtype=bool),
    "hole_pinched_at_a_corner": np.array([[1, 1, 1, 1, 1],
                                          [1, 0, 1, 1, 1],
                                          [1, 1, 0, 1, 1],
                                          [1, 1, 1, 1, 1]], bool),
    "blobs": random_mask(60, 80, 0),
    "noise": np.random.default_rng(1).random((37, 41)) > 0.5,  # many islands, holes and corner contacts
    "checker": (np.indices((9, 9)).sum(0) % 2).astype(bool),
    "full": np.ones((7, 5), bool),
    "border_touching": random_mask(50, 30, 7, density=0.7),
    "single_pixel": np.pad(np.ones((1, 1), bool), ((4, 0), (0, 3))),
}


@pytest.mark.parametrize("name", sorted(MASKS))
def test_polygons_are_valid_exact_and_fill_back_to_the_mask(name):
    mask = MASKS[name]
    regions = mask_to_polygons(mask)
    geoms = list(regions.geoms)
    assert all(isinstance(g, (Polygon, MultiPolygon)) for g in geoms)
    assert all(g.is_valid for g in geoms), [shapely.is_valid_reason(g) for g in geoms if not g.is_valid]
    _, count = ndimage.label(mask, EIGHT)
    assert len(geoms) == count  # one geometry per 8-connected region
    areas = sorted(g.area for g in geoms)  # pixel-edge convention: area is exactly the pixel count
    labels, _ = ndimage.label(mask, EIGHT)
    assert areas == sorted(np.bincount(labels.ravel())[1:].astype(float).tolist())
    np.testing.assert_array_equal(centres_inside(geoms, mask.shape), mask)
    rings = [[np.asarray(p.exterior.coords)] + [np.asarray(r.coords) for r in p.interiors]
             for g in geoms for p in polygon_parts(g)]
    np.testing.assert_array_equal(even_odd_fill(rings, mask.shape), mask)
    for g in geoms:  # RFC 7946 orientation in the numbers: exterior counter-clockwise, holes clockwise
        for p in polygon_parts(g):
            assert p.exterior.is_ccw and not any(r.is_ccw for r in p.interiors)


def test_holes_are_interior_rings():
    (g,) = mask_to_polygons(square_with_hole()).geoms
    assert isinstance(g, Polygon) and len(g.interiors) == 1
    assert Polygon(g.interiors[0]).area == 16 and g.area == 64 - 16
    assert sorted(np.asarray(g.exterior.coords).min(0)) == [2, 2]  # corners of pixels 2..9, not their centres
    geoms = mask_to_polygons(nested_rings()).geoms
    assert sorted(len(g.interiors) for g in geoms) == [0, 1, 1]
    assert sorted(g.area for g in geoms) == [1, 7 * 7 - 9, 15 * 15 - 11 * 11]


def test_one_pixel_wide_regions_keep_their_area():
    assert [g.area for g in mask_to_polygons(MASKS["line_horizontal"]).geoms] == [9]
    (g,) = mask_to_polygons(MASKS["line_diagonal"]).geoms  # one 8-connected region of corner-touching pixels
    assert isinstance(g, MultiPolygon) and len(g.geoms) == 8 and g.area == 8 and g.is_valid
    (g,) = mask_to_polygons(diagonal_pair()).geoms
    assert isinstance(g, MultiPolygon) and g.area == 2


def test_many_random_islands():
    rng = np.random.default_rng(5)
    mask = ndimage.gaussian_filter(rng.random((300, 400)), 1.2) > 0.52
    labels, count = ndimage.label(mask, EIGHT)
    assert count > 300
    regions = mask_to_polygons(mask)
    assert len(regions) == count and shapely.is_valid(regions.geoms).all()
    assert regions.areas.sum() == mask.sum()
    assert sum(len(p.interiors) for g in regions.geoms for p in polygon_parts(g)) > 10  # holes present
    np.testing.assert_array_equal(centres_inside(regions.geoms, mask.shape), mask)


def test_scale_and_clip_give_level0_coordinates():
    mask = np.ones((3, 3), bool)
    (g,) = mask_to_polygons(mask, 10, clip=(25, 28)).geoms
    assert g.bounds == (0, 0, 25, 28) and g.area == 25 * 28
    (g,) = mask_to_polygons(mask, (2.5, 4)).geoms
    assert g.bounds == (0, 0, 7.5, 12)
    with pytest.raises(ConfigError, match="2-D"):
        mask_to_polygons(np.ones((2, 2, 2), bool))
    assert len(mask_to_polygons(np.zeros((5, 5), bool))) == 0


def test_min_area_drops_exactly_the_regions_under_it():
    mask = np.zeros((30, 40), bool)
    sizes = {(1, 1): 1, (1, 4): 3, (1, 9): 4, (1, 15): 5, (1, 22): 10}  # top-left -> pixels, in a row
    for (y, x), n in sizes.items():
        mask[y, x:x + n] = True
    mask[10:20, 10:20] = True
    mask[13:16, 13:16] = False  # 100 - 9 = 91 pixels
    scale, mpp = 4, 0.5  # one mask pixel = 16 level-0 px = 4 um^2
    coll, info = tumour_geojson(mask, scale, mpp=mpp, min_region_um2=4 * 4)  # 4 mask pixels
    kept = sorted(round(shape(f["geometry"]).area / scale ** 2) for f in json.loads(coll)["features"])
    assert kept == [4, 5, 10, 91]  # a region of exactly the threshold is kept
    assert info["kept"] == 4 and info["dropped"] == 2
    assert info["dropped_area_pixels_level0"] == (1 + 3) * scale ** 2
    assert info["dropped_area_mm2"] == pytest.approx((1 + 3) * 4 / 1e6)
    assert info["min_region_um2"] == 16 and "um^2" in info["rule"]
    # no MPP: a level-0 pixel count, and the report's rule says so
    coll, info = tumour_geojson(mask, scale, mpp=None, min_region_um2=16, min_region_pixels=5 * scale ** 2)
    assert info["kept"] == 3 and info["dropped"] == 3 and info["min_region_um2"] is None
    assert info["dropped_area_mm2"] is None and "no MPP" in info["rule"]
    assert min_region_area(0.25)[0] == pytest.approx(1600)  # 100 um^2 default at 40x
    with pytest.raises(ConfigError, match="min_region_um2"):
        min_region_area(0.25, -1)


def test_geojson_rasterises_back_in_level0_coordinates(tmp_path):
    mask = random_mask(64, 48, 3, density=0.3)
    scale = 8  # level-0 pixels per mask pixel
    coll = geojson_features(mask_to_polygons(mask, scale), mpp=0.25)
    data = json.loads(write_geojson(tmp_path / "t.geojson", coll).read_text(encoding="utf-8"))
    np.testing.assert_array_equal(fill_features(data["features"], mask.shape, scale), mask)
    # each feature's area against the pixel count of its region, counted here (one feature per 8-connected
    # region): mask pixels x scale^2 level-0 pixels x 0.25^2 um^2
    labels, count = ndimage.label(mask, EIGHT)
    expect = sorted(float(n) * scale ** 2 * 0.25 ** 2 for n in np.bincount(labels.ravel())[1:])
    got = sorted(f["properties"]["measurements"]["Area µm^2"] for f in data["features"])
    assert len(got) == count > 5 and got == pytest.approx(expect, abs=0.01)


# What QuPath reads, written down by hand from its GeoJSON reader (qupath-core qupath.lib.io:
# PathObjectTypeAdapters, ROITypeAdapters; QuPath 0.4-0.6) and the QuPath docs ("Exporting annotations":
# coordinates in pixels of the full-resolution image, origin at its top left):
#  - a FeatureCollection: {"type": "FeatureCollection", "features": [...]};
#  - a Feature: "type" "Feature"; optional "id", read as a UUID; "geometry" a GeoJSON geometry (Polygon or
#    MultiPolygon for an area); "properties" an object;
#  - a ring becomes a JTS LinearRing: closed (first position == last) and at least 4 positions; a position
#    is [x, y] of numbers;
#  - properties: "objectType" "annotation"; "classification" {"name": str, "color": [r, g, b] ints 0-255};
#    "isLocked" a boolean; "measurements" an object of name -> number; "metadata" an object of name -> string.
# Orientation is not read by QuPath; RFC 7946 asks exterior rings counter-clockwise, holes clockwise.
QUPATH_PROPERTY_TYPES = {"objectType": str, "classification": dict, "isLocked": bool, "measurements": dict,
                         "metadata": dict, "name": str, "color": list}


def check_qupath_feature(f):
    assert set(f) <= {"type", "id", "geometry", "properties"} and f["type"] == "Feature"
    uuid.UUID(f["id"])
    geom = f["geometry"]
    assert set(geom) == {"type", "coordinates"} and geom["type"] in ("Polygon", "MultiPolygon")
    polygons = [geom["coordinates"]] if geom["type"] == "Polygon" else geom["coordinates"]
    assert polygons
    for rings in polygons:
        assert isinstance(rings, list) and rings
        for i, ring in enumerate(rings):
            assert len(ring) >= 4 and ring[0] == ring[-1]
            for pos in ring:
                assert len(pos) == 2 and all(type(v) in (int, float) and np.isfinite(v) for v in pos)
                assert all(type(v) is int for v in pos if float(v).is_integer())  # integral -> integer
            x, y = np.array(ring, float).T
            signed = 0.5 * np.sum(x[:-1] * y[1:] - x[1:] * y[:-1])
            assert (signed > 0) == (i == 0)  # exterior counter-clockwise in the numbers, holes clockwise
    props = f["properties"]
    for k, t in QUPATH_PROPERTY_TYPES.items():
        assert k not in props or isinstance(props[k], t), k
    assert props["objectType"] == "annotation"
    cls = props["classification"]
    assert set(cls) == {"name", "color"} and cls["name"] == "Tumor"
    assert len(cls["color"]) == 3 and all(type(c) is int and 0 <= c <= 255 for c in cls["color"])
    assert all(type(v) in (int, float) for v in props.get("measurements", {}).values())
    assert all(isinstance(v, str) for v in props.get("metadata", {}).values())


def test_geojson_matches_qupaths_documented_format(tmp_path):
    mask = np.zeros((40, 40), bool)
    mask[2:12, 2:12] = True
    mask[5:8, 5:8] = False  # a hole
    mask[20, 20] = mask[21, 21] = True  # corner contact: a MultiPolygon
    mask[30:39, 25:39] = random_mask(9, 14, 2, density=0.6)
    name = "Präparat 東京 №1.svs"
    for scale, clip in ((4, None), (4.0003, (150.5, 160))):  # integral, and fractional level-0 coordinates
        coll, _ = tumour_geojson(mask, scale, clip=clip, mpp=0.25, min_region_um2=0, slide_name=name)
        path = write_geojson(tmp_path / "q.geojson", coll)
        raw = path.read_bytes()
        data = json.loads(raw.decode("utf-8"), parse_constant=lambda c: pytest.fail(f"{c} in the JSON"))
        assert name.encode("utf-8") in raw  # the slide's real name, as UTF-8 text
        assert set(data) == {"type", "features"} and data["type"] == "FeatureCollection"
        assert {f["geometry"]["type"] for f in data["features"]} == {"Polygon", "MultiPolygon"}
        for f in data["features"]:
            check_qupath_feature(f)
            assert f["properties"]["metadata"]["slide"] == name
            assert shape(f["geometry"]).is_valid
        assert len({f["id"] for f in data["features"]}) == len(data["features"])
    assert json.loads(geojson_features(mask_to_polygons(np.zeros((3, 3), bool)))) == {
        "type": "FeatureCollection", "features": []}


def geos_geojson_text(geoms):
    """The reference text: GEOS's GeoJSON of each geometry, integral coordinates without ".0"."""
    import re
    return [re.sub(r"\.0(?=[,\]])", "", g) for g in shapely.to_geojson(np.asarray(geoms, object)).tolist()]


@pytest.mark.parametrize("seed", range(4))
def test_fast_paths_give_what_geos_gives(seed):
    """Validity checked only near corner contacts, and integral GeoJSON typed out with NumPy: the same
    repairs as checking every polygon, and the same text as GEOS writes."""
    from fastgicn.outputs import geojson as G

    mask = np.random.default_rng(seed).random((45, 52)) > (0.4 + 0.05 * seed)
    mask[:3, :4] = True  # touches the border
    for scale, clip in ((1, None), (16, (52 * 16 - 5, 45 * 16)), (3.25, None), (4, (51 * 4, 45 * 4)),
                        (10, (50 * 10.0, 44.5 * 10))):
        regions = mask_to_polygons(mask, scale, clip=clip)
        geoms = list(regions.geoms)
        assert all(g.is_valid for g in geoms)
        fast = G._integral_geojson(regions.geoms)
        ref = geos_geojson_text(geoms)
        if not float(scale).is_integer():
            assert fast is None  # fractional coordinates: GEOS writes them
        elif shapely.is_empty(regions.geoms).any():
            assert fast is None  # a region clipped away to nothing: GEOS writes its empty geometry
        else:
            assert fast == ref
        coll = geojson_features(regions)
        assert [json.dumps(f["geometry"], separators=(",", ":")) for f in json.loads(coll)["features"]] == ref
    # a clip inside the last pixel's span collapses vertices: every polygon is then checked (and repaired)
    m = np.zeros((6, 6), bool)
    m[1:5, 4] = True
    m[2, 5] = True
    m[4, 5] = True
    regions = mask_to_polygons(m, 10, clip=(50, 60))
    assert all(g.is_valid for g in regions.geoms) and regions.areas.sum() == pytest.approx(40 * 10)


def test_validity_shortcut_repairs_the_same_polygons_as_checking_all(monkeypatch):
    from fastgicn.outputs import polygons as P

    rng = np.random.default_rng(11)
    masks = [ndimage.gaussian_filter(rng.random((120, 150)), s) > q for s, q in ((0.8, 0.5), (1.5, 0.52))]
    masks.append(rng.random((60, 60)) > 0.5)
    for mask in masks:
        fast = mask_to_polygons(mask, 2)
        monkeypatch.setattr(P, "_corner_touch_candidates", lambda *a: None)
        slow = mask_to_polygons(mask, 2)
        monkeypatch.undo()
        assert fast.repaired == slow.repaired > 0
        assert all(a.equals_exact(b, 0) for a, b in zip(fast.geoms, slow.geoms))
        assert geos_geojson_text(fast.geoms) == geos_geojson_text(slow.geoms)


def test_pinched_polygons_repair_as_make_valid_would(monkeypatch):
    """The fast repair (buffer(0)) gives the geometries make_valid(method="structure") gives, and where it
    cannot be trusted (here: forced to return an empty geometry) make_valid repairs the polygon."""
    from fastgicn.outputs import polygons as P

    mask = ndimage.gaussian_filter(np.random.default_rng(5).random((120, 150)), 0.8) > 0.5
    pinched = []
    original = P._repair_pinched
    monkeypatch.setattr(P, "_repair_pinched", lambda g: pinched.append(g.copy()) or original(g))
    regions = mask_to_polygons(mask, 3)
    (bad,) = pinched
    assert regions.repaired == len(bad) > 10
    reference = shapely.make_valid(bad, method="structure", keep_collapsed=False)
    assert shapely.equals(original(bad), reference).all()
    monkeypatch.setattr(shapely, "buffer", lambda g, d: np.array([Polygon()] * len(g), object))
    fixed = original(bad)
    assert shapely.is_valid(fixed).all() and shapely.equals(fixed, reference).all()


@pytest.mark.parametrize("seed", range(3))
def test_strips_on_threads_give_the_regions_of_one_trace(monkeypatch, seed):
    """Tracing horizontal strips on threads (regions crossing a cut traced on their own) gives exactly the
    polygons, repairs and dropped specks of a single trace, in the same order, whatever the number of strips."""
    import fastgicn.outputs.polygons as polygons

    monkeypatch.setattr(polygons, "PARALLEL_MIN_PIXELS", 0)
    monkeypatch.setattr(polygons, "PARALLEL_MIN_REGIONS", 0)
    rng = np.random.default_rng(seed)
    for trial in range(40):
        h, w = (int(v) for v in rng.integers(8, 90, 2))
        field = ndimage.gaussian_filter(rng.random((h, w)), rng.uniform(0.3, 3))
        mask = field > np.quantile(field, rng.uniform(0.2, 0.8))
        if trial % 3 == 0:
            mask[:, rng.integers(0, w)] = True  # one region through every cut
        if trial % 5 == 0:  # a ring with a hole that spans a cut
            mask[1:-1, 1:4] = mask[1:-1, -4:-1] = mask[1:4, 1:-1] = mask[-4:-1, 1:-1] = True
        scale = (1.0, 2.5, (3.0, 2.0))[trial % 3]
        clip = None if trial % 4 else (w * 2.4, h * 1.9)
        min_area = (0, 3, 10)[trial % 3]
        one = mask_to_polygons(mask, scale, clip=clip, min_area=min_area, threads=1)
        assert shapely.is_valid(one.geoms).all()
        for threads in (2, 3):
            many = mask_to_polygons(mask, scale, clip=clip, min_area=min_area, threads=threads)
            assert (len(many), many.repaired, many.dropped) == (len(one), one.repaired, one.dropped)
            assert many.dropped_area == pytest.approx(one.dropped_area)
            for a, b in zip(one.geoms, many.geoms):
                assert a.equals_exact(b, 0) or shapely.equals(a, b), (trial, threads)


def test_regions_come_in_raster_order_of_their_first_pixel():
    mask = np.zeros((12, 12), bool)
    mask[6:9, 0:2] = True  # first pixel (0, 6)
    mask[1:3, 8:10] = True  # (8, 1)
    mask[1:5, 3:5] = True  # (3, 1): same top row, further left
    mask[10, 5] = True  # (5, 10)
    firsts = [min((y, x) for x, y in shapely.get_coordinates(g).tolist()) for g in mask_to_polygons(mask).geoms]
    assert firsts == [(1, 3), (1, 8), (6, 0), (10, 5)]


@pytest.mark.parametrize("threads", [1, 2])
def test_specks_removed_before_tracing_are_the_ones_tracing_all_drops(monkeypatch, threads):
    """Regions under min_area are dropped from their pixel count (clipped at the slide's edge) before tracing;
    with that shortcut off every region is traced and measured as a polygon: the same regions, counts and area."""
    import fastgicn.outputs.polygons as polygons

    monkeypatch.setattr(polygons, "PARALLEL_MIN_PIXELS", 0)
    monkeypatch.setattr(polygons, "PARALLEL_MIN_REGIONS", 0)
    rng = np.random.default_rng(11)
    for trial in range(60):
        h, w = (int(v) for v in rng.integers(8, 80, 2))
        field = ndimage.gaussian_filter(rng.random((h, w)), rng.uniform(0.3, 2))
        mask = field > np.quantile(field, rng.uniform(0.3, 0.8))
        scale = (1.0, 2.5, (1.37, 0.71), 4.0)[trial % 4]
        sx, sy = (scale, scale) if np.isscalar(scale) else scale
        clip = None if trial % 3 == 0 else (w * sx - rng.uniform(0, sx), h * sy - rng.uniform(0, sy))
        min_area = float(rng.uniform(0.5, 12)) * sx * sy
        fast = mask_to_polygons(mask, scale, clip=clip, min_area=min_area, threads=threads)
        with monkeypatch.context() as m:
            m.setattr(polygons, "_region_areas", lambda *a: None)
            slow = mask_to_polygons(mask, scale, clip=clip, min_area=min_area, threads=threads)
        assert (len(fast), fast.dropped, fast.repaired) == (len(slow), slow.dropped, slow.repaired), trial
        # polygons' vertices are rounded to 1/1000 pixel (an area error under 1/1000 of the perimeter),
        # pixel counts are exact
        perimeter_bound = 2 * (sx + sy) * int(mask.sum())
        assert fast.dropped_area == pytest.approx(slow.dropped_area, abs=1e-3 * perimeter_bound)
        assert all(a.equals_exact(b, 0) for a, b in zip(fast.geoms, slow.geoms))


def test_a_region_at_the_threshold_is_decided_on_its_polygon():
    """At a fractional scale the polygon's vertices are rounded to 1/1000 pixel: a one-pixel region at scale 2/3
    has the exact area 4/9 = 0.4444 but the polygon (0, 0)-(0.667, 0.667) holds 0.444889. With the threshold
    between the two, the region is kept, as its polygon's area says (the speck shortcut leaves it alone)."""
    mask = np.zeros((4, 4), bool)
    mask[0, 0] = True
    (g,) = mask_to_polygons(mask, 2 / 3, min_area=0.4446).geoms
    assert g.area == pytest.approx(0.667 ** 2) and g.area >= 0.4446
    assert len(mask_to_polygons(mask, 2 / 3, min_area=0.4449)) == 0
