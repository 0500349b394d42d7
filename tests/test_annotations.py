"""Annotation files in (ASAP XML, QuPath GeoJSON): group and class rules, guards, clear errors,
`fastgicn mask`, and training from annotations."""
from __future__ import annotations

import json

import numpy as np
import openslide
import pytest

from fastgicn.annotations import AnnotationError, read_annotations
from fastgicn.cli import main
from fastgicn.errors import SlideError

SQUARE = [[10, 10], [50, 10], [50, 50], [10, 50]]


def _asap(annotations, groups=("Tumor", "_0", "_1", "_2", "Exclusion")) -> str:
    """ASAP XML as Camelyon16 ships it: annotations (name, group, points) and the group list."""
    parts = ['<?xml version="1.0"?>', "<ASAP_Annotations>", "<Annotations>"]
    for name, group, points, *kind in annotations:
        shape = kind[0] if kind else "Polygon"
        parts.append(f'<Annotation Name="{name}" Type="{shape}" PartOfGroup="{group}" '
                     'Color="#F4FA58"><Coordinates>')
        order = list(range(len(points)))[::-1]  # written out of order: the Order attribute decides
        for i in order:
            x, y = points[i]
            parts.append(f'<Coordinate Order="{i}" X="{x}" Y="{y}" />')
        parts.append("</Coordinates></Annotation>")
    parts += ["</Annotations>", "<AnnotationGroups>"]
    parts += [f'<Group Name="{g}" PartOfGroup="None" Color="#64FE2E"><Attributes /></Group>' for g in groups]
    parts += ["</AnnotationGroups>", "</ASAP_Annotations>"]
    return "\n".join(parts)


def _feature(rings, cls=None, name=None, geometry="Polygon", object_type="annotation"):
    props = {"objectType": object_type}
    if cls is not None:
        props["classification"] = {"name": cls, "color": [200, 0, 0]}
    if name:
        props["name"] = name
    return {"type": "Feature", "id": "x", "geometry": {"type": geometry, "coordinates": rings},
            "properties": props}


def _write(tmp_path, name, content) -> str:
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


# ------------------------------------------------------------------------------------------ ASAP XML
def test_asap_camelyon16_groups_order_and_decimal_commas(tmp_path):
    path = _write(tmp_path, "tumor_001.xml", _asap([
        ("Annotation 0", "Tumor", [(10.5, 20.25), (110, 20), (110, 120), (10, 120)]),
        ("Annotation 1", "_1", [("200,5", "30"), (260, 30), (260, 90)]),
        ("Annotation 2", "_2", [(20, 30), (40, 30), (40, 50)]),
        ("Annotation 3", "Exclusion", [(60, 60), (70, 60), (70, 70)]),
    ]))
    ann = read_annotations(path)
    assert [r.name for r in ann.tumour] == ["Annotation 0", "Annotation 1"]
    assert [r.name for r in ann.exclusion] == ["Annotation 2", "Annotation 3"]
    np.testing.assert_array_equal(ann.tumour[0].rings[0], [[10.5, 20.25], [110, 20], [110, 120], [10, 120]])
    assert ann.tumour[1].rings[0][0, 0] == 200.5  # "200,5" as a European-locale ASAP writes it


def test_asap_tumour_groups_can_be_changed_and_unknown_groups_are_named(tmp_path):
    path = _write(tmp_path, "s.xml", _asap([("Annotation 0", "Tumor", SQUARE),
                                            ("Annotation 7", "Stroma", SQUARE)], groups=("Tumor", "Stroma")))
    with pytest.raises(AnnotationError) as err:
        read_annotations(path)
    msg = str(err.value)
    assert str(path) in msg and "'Stroma'" in msg and "Annotation 7" in msg and "--tumour-groups" in msg
    ann = read_annotations(path, tumour_groups=["Tumor", "Stroma"])
    assert len(ann.tumour) == 2
    ann = read_annotations(path, exclusion_groups=["Stroma"])
    assert len(ann.tumour) == 1 and len(ann.exclusion) == 1
    with pytest.raises(AnnotationError, match="neither tumour"):  # a filter that matches nothing
        read_annotations(path, tumour_groups=["Metastasis"], exclusion_groups=[])


def test_asap_nested_groups_and_point_annotations(tmp_path):
    xml = _asap([("a", "Sub", SQUARE), ("dot", "Tumor", [(5, 5)], "Dot")], groups=("Tumor",)).replace(
        "</AnnotationGroups>", '<Group Name="Sub" PartOfGroup="Tumor" Color="#000000"/></AnnotationGroups>')
    ann = read_annotations(_write(tmp_path, "s.xml", xml))
    assert [r.name for r in ann.tumour] == ["a"]
    assert any("'dot'" in w and "no area" in w for w in ann.warnings)


@pytest.mark.parametrize("xml, expected", [
    ('<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;">]>'
     "<ASAP_Annotations>&lol2;</ASAP_Annotations>", "refused"),
    ('<?xml version="1.0"?><!DOCTYPE a [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>'
     "<ASAP_Annotations>&xxe;</ASAP_Annotations>", "refused"),
    ("<ASAP_Annotations><Annotations>", "not well-formed"),
    ("<svg></svg>", "not <ASAP_Annotations>"),
])
def test_hostile_or_broken_xml_is_refused_clearly(tmp_path, xml, expected):
    path = _write(tmp_path, "bad.xml", xml)
    with pytest.raises(AnnotationError, match=expected) as err:
        read_annotations(path)
    assert str(path) in str(err.value) and "passwd" not in str(err.value)


def test_files_above_the_size_bound_are_refused_with_the_bound_and_the_fix(tmp_path, monkeypatch):
    path = _write(tmp_path, "big.geojson",
                  {"type": "FeatureCollection", "features": [_feature([SQUARE])] * 500})
    size_mb = path.stat().st_size / 1e6
    with pytest.raises(AnnotationError) as err:
        read_annotations(path, max_mb=size_mb / 2)
    assert f"{size_mb / 2:g} MB bound" in str(err.value) and "--max-annotation-mb" in str(err.value)
    monkeypatch.setenv("FASTGICN_MAX_ANNOTATION_MB", str(size_mb / 2))
    with pytest.raises(AnnotationError, match="FASTGICN_MAX_ANNOTATION_MB"):
        read_annotations(path)
    assert len(read_annotations(path, max_mb=size_mb * 2).tumour) == 500


# ------------------------------------------------------------------------------------------ GeoJSON
def test_geojson_forms_multipolygons_and_holes(tmp_path):
    hole = [[20, 20], [30, 20], [30, 30], [20, 30], [20, 20]]
    outer = SQUARE + [SQUARE[0]]
    triangle = [[100, 100], [120, 100], [110, 120], [100, 100]]
    multi = _feature([[outer, hole], [triangle]], geometry="MultiPolygon", name="two parts")
    collection = {"type": "FeatureCollection", "features": [multi]}
    for content in (collection, multi, [multi]):
        ann = read_annotations(_write(tmp_path, "a.geojson", content))
        assert [r.name for r in ann.tumour] == ["two parts part 1", "two parts part 2"]
        assert len(ann.tumour[0].rings) == 2 and len(ann.tumour[0].rings[0]) == 4  # closing point dropped
    bare = read_annotations(_write(tmp_path, "b.geojson", {"type": "Polygon", "coordinates": [outer]}))
    assert len(bare.tumour) == 1


def test_geojson_classes_old_and_new_and_object_types(tmp_path):
    old_style = {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [SQUARE]},
                 "properties": {"classification": "Stroma"}}
    features = [_feature([SQUARE], "Tumor", "t1"), _feature([SQUARE], "Tumor", "t2"), old_style,
                _feature([SQUARE], "Tumor", "cell", object_type="cell"),
                _feature([SQUARE], "Exclusion", "x")]
    path = _write(tmp_path, "c.geojson", {"type": "FeatureCollection", "features": features})
    with pytest.raises(AnnotationError, match="several classes .*Exclusion, Stroma, Tumor.*--class"):
        read_annotations(path)
    ann = read_annotations(path, classes=["Tumor"], exclude_classes=["Exclusion"])
    assert [r.name for r in ann.tumour] == ["t1", "t2"] and [r.name for r in ann.exclusion] == ["x"]
    assert any("1 cell object(s) skipped" in w for w in ann.warnings)
    assert [r.name for r in read_annotations(path, classes=["Stroma"]).tumour] == ["feature 2"]
    with pytest.raises(AnnotationError, match="no annotation of class Metastasis.*Exclusion, Stroma, Tumor"):
        read_annotations(path, classes=["Metastasis"])


@pytest.mark.parametrize("content, expected", [
    ("not json at all", "neither XML nor JSON"),
    ("{ broken", "not valid JSON"),
    ({"type": "Point", "coordinates": [1, 2]}, "not GeoJSON features"),
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ({"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [1e300, 0], [5, 5]]]}},
     "annotation 'feature 0': its outline has a coordinate beyond"),
    ({"type": "FeatureCollection", "features": [_feature([[[0, 0], [5, 5], [0, 0]]], name="sliver")]},
     "annotation 'sliver': its outline has 2 distinct point"),
    ({"type": "FeatureCollection", "features": [_feature([SQUARE, [[1, 1], [2, 2]]], name="holey")]},
     "annotation 'holey': its hole 1 has 2 distinct point"),
    ({"type": "FeatureCollection", "features": [_feature([[[0, 0], [5, "x"], [9, 1]]], name="texty")]},
     "annotation 'texty'.*not numbers"),
])
def test_malformed_geojson_names_the_file_and_the_annotation(tmp_path, content, expected):
    path = _write(tmp_path, "m.geojson", content)
    with pytest.raises(AnnotationError, match=expected) as err:
        read_annotations(path)
    assert str(path) in str(err.value)


def test_coordinates_outside_the_slide_are_clipped_with_a_warning(tmp_path):
    from fastgicn.annotations import Annotations, Region

    inside = Region("in", None, (np.array([[1.0, 1], [9, 1], [9, 9]]),))
    crossing = Region("edge", None, (np.array([[50.0, 50], [150, 50], [150, 90]]),))
    away = Region("away", None, (np.array([[500.0, 500], [600, 500], [600, 600]]),))
    warnings = Annotations("f.xml", [inside, crossing, away]).clip_warnings(100, 100)
    assert len(warnings) == 2
    assert "'edge'" in warnings[0] and "clipped" in warnings[0]
    assert "'away'" in warnings[1] and "wholly outside" in warnings[1]
    with pytest.raises(AnnotationError, match="none of its 1 tumour annotations overlaps the 100x100 slide"):
        Annotations("f.xml", [away]).clip_warnings(100, 100)


# ------------------------------------------------------------------------------------------ fastgicn mask
@pytest.fixture(scope="module")
def small_slide(tmp_path_factory):
    from fastgicn.synth import write_synthetic_slide

    return write_synthetic_slide(tmp_path_factory.mktemp("slide") / "tumor_007.tif", 1024, 768, seed=5)


def _trace_to_geojson(mask_path, out_path):
    """The synthetic ground truth as QuPath annotations, traced by fastgicn.outputs.polygons."""
    from fastgicn.outputs.geojson import tumour_geojson, write_geojson
    from fastgicn.slide import open_slide

    with open_slide(mask_path) as m:
        mask = m.read_region(0, 0, 0, *m.dimensions)[..., 0] > 127
    text, info = tumour_geojson(mask, 1, min_region_um2=0, mpp=m.mpp)
    write_geojson(out_path, text)
    return mask, info["kept"]


def test_mask_command_reproduces_the_synthetic_truth_from_geojson_and_asap(small_slide, tmp_path, capsys):
    slide, truth_mask = small_slide
    truth, regions = _trace_to_geojson(truth_mask, tmp_path / "tumor_007.geojson")
    assert regions >= 1 and truth.any()
    assert main(["mask", str(slide), str(tmp_path / "tumor_007.geojson"), "-o", str(tmp_path / "g.tif")]) == 0
    assert "tumour polygons" in capsys.readouterr().out
    with openslide.OpenSlide(str(tmp_path / "g.tif")) as s:
        assert s.dimensions == (1024, 768)
        assert float(s.properties["openslide.mpp-x"]) == pytest.approx(0.25)
        got = np.asarray(s.read_region((0, 0), 0, s.dimensions))[..., 0]
    np.testing.assert_array_equal(got > 0, truth)

    # the same outlines as Camelyon16 ASAP XML, with an exclusion cut out of the first one
    features = json.loads((tmp_path / "tumor_007.geojson").read_text())["features"]
    rings = [f["geometry"]["coordinates"][0][:-1] for f in features if f["geometry"]["type"] == "Polygon"
             and len(f["geometry"]["coordinates"]) == 1]
    assert rings
    x0, y0 = np.min(rings[0], axis=0)
    excl = [(x0, y0), (x0 + 8, y0), (x0 + 8, y0 + 8), (x0, y0 + 8)]
    _write(tmp_path, "t.xml", _asap([("Annotation 0", "_0", rings[0]), ("Annotation 1", "Exclusion", excl)]))
    assert main(["mask", str(slide), str(tmp_path / "t.xml"), "-o", str(tmp_path / "x.tif")]) == 0
    with openslide.OpenSlide(str(tmp_path / "x.tif")) as s:
        got = np.asarray(s.read_region((0, 0), 0, s.dimensions))[..., 0]
    assert not got[int(y0):int(y0) + 8, int(x0):int(x0) + 8].any()
    assert got.any()


@pytest.mark.parametrize("content, expected", [
    ("garbage", "neither XML nor JSON"),
    (_asap([("Annotation 3", "Stroma", SQUARE)], groups=("Stroma",)), "group 'Stroma'"),
    ({"type": "FeatureCollection", "features": [_feature([[[0, 0], [1, 1], [0, 0]]], name="tiny")]},
     "'tiny'"),
    ({"type": "FeatureCollection", "features": [_feature([[[5000, 5000], [6000, 5000], [6000, 6000]]])]},
     "none of its 1 tumour annotations overlaps"),
])
def test_mask_command_errors_are_one_line_without_traceback(small_slide, tmp_path, capsys, content, expected):
    slide, _ = small_slide
    path = _write(tmp_path, "bad.geojson", content)
    assert main(["mask", str(slide), str(path), "-o", str(tmp_path / "out.tif")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastgicn mask: error: ") and expected in err and str(path) in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "out.tif").exists()


def test_mask_command_warns_about_clipped_annotations(small_slide, tmp_path, capsys):
    slide, _ = small_slide
    path = _write(tmp_path, "edge.geojson", _feature([[[1000, 700], [1100, 700], [1100, 800], [1000, 800]]],
                                                      name="corner"))
    assert main(["mask", str(slide), str(path), "-o", str(tmp_path / "m.tif")]) == 0
    assert "warning:" in capsys.readouterr().err
    with openslide.OpenSlide(str(tmp_path / "m.tif")) as s:
        got = np.asarray(s.read_region((0, 0), 0, s.dimensions))[..., 0]
    assert (got > 0).sum() == 24 * 68  # the part on the slide: columns 1000..1023, rows 700..767


# ------------------------------------------------------------------------------------------ training
def test_training_from_geojson_equals_training_from_the_mask(small_slide, tmp_path):
    """Camelyon16's layout (images/ and annotations/): the GeoJSON traced from the synthetic mask gives the
    very same patches and labels as the mask, so the same seed trains the very same weights; a normal_*
    slide without annotations is an all-normal negative."""
    import shutil

    import torch

    from fastgicn.train import PatchDataset, SlideSource, load_checkpoint

    slide, truth_mask = small_slide
    images, annotations = tmp_path / "images", tmp_path / "annotations"
    images.mkdir(), annotations.mkdir()
    shutil.copy(slide, images / slide.name)
    shutil.copy(slide, images / "normal_001.tif")
    _trace_to_geojson(truth_mask, annotations / "tumor_007.geojson")
    from_mask = PatchDataset([SlideSource(slide, truth_mask)], size=64)
    from_geojson = PatchDataset([SlideSource(images / slide.name, annotations_dir=annotations)], size=64)
    assert [(p.l0_x, p.l0_y, p.tumour_fraction) for p in from_mask.patches] == \
        [(p.l0_x, p.l0_y, p.tumour_fraction) for p in from_geojson.patches]
    assert len(from_geojson.positive) > 0
    # at downsample 2 the mask is box-reduced (tumour where >= 2 of 4) and the polygons are sampled at the
    # 2x2 block's centre: they differ only along outlines
    from_mask = PatchDataset([SlideSource(slide, truth_mask)], size=64, downsample=2)
    from_geojson = PatchDataset([SlideSource(images / slide.name, annotations_dir=annotations)], size=64,
                                downsample=2)
    i = int(from_geojson.positive[0])
    a, b = from_mask[i][1], from_geojson[i][1]
    assert b.any() and (a != b).sum() <= 0.02 * a.size + 0.5 * (a | b).sum() ** 0.5 * 4
    normal = SlideSource(images / "normal_001.tif", annotations_dir=annotations)
    assert normal.truth_kind == "none" and not normal.read_mask(0, 0, 64, 1).any()
    assert "all-normal negative" in normal.warnings[0]
    with pytest.raises(SlideError, match="no ground truth for .*tumor_007.tif"):  # no silent negatives
        SlideSource(images / slide.name)

    train = ["train", "--patch-size", "64", "--batch-size", "2", "--width", "0.0625", "--iterations", "2",
             "--checkpoint-every", "0", "--log-every", "0", "--schedule", "constant", "--lr", "0.01",
             "--seed", "3"]
    assert main(train + [str(slide), "--masks", str(truth_mask), "-o", str(tmp_path / "m")]) == 0
    assert main(train + [str(images / slide.name), str(images / "normal_001.tif"), "--annotations",
                         str(annotations), "-o", str(tmp_path / "g")]) == 0
    assert main(train + [str(images / slide.name), "--annotations", str(annotations),
                         "-o", str(tmp_path / "a")]) == 0
    a, m = load_checkpoint(tmp_path / "a" / "last.pt"), load_checkpoint(tmp_path / "m" / "last.pt")
    assert a["iteration"] == 2
    for k, v in m["state_dict"].items():
        assert torch.equal(v, a["state_dict"][k]), k
