"""`fastgicn evaluate`: Dice, precision, recall and the XS/XL split against hand-computed values; truth as
masks or annotations; agreement with the Dice of the segment report; the paper's figures labelled."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from fastgicn.cli import main
from fastgicn.errors import ConfigError
from fastgicn.evaluate import evaluate
from fastgicn.outputs.tiff import write_pyramid

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _tiff(path, mask: np.ndarray, mpp=None):
    """A 0/255 pyramidal mask TIFF as segment (prediction) or synth (truth) writes one."""
    img = np.where(mask, 255, 0).astype(np.uint8)
    write_pyramid(path, img.shape[1], img.shape[0], lambda x, y, w, h: img[y:y + h, x:x + w], channels=1,
                  tile=64, compression="deflate", downsample="majority", mpp=mpp, min_level_size=16)
    return path


def _prediction(out, stem, mask, level0, downsample, model="resnet50_gicn_gpp"):
    _tiff(out / f"{stem}.tumour_mask.tif", mask)
    report = {"slide": {"dimensions": list(level0)}, "read": {"downsample": downsample},
              "model": {"name": model}}
    (out / f"{stem}.report.json").write_text(json.dumps(report))


def _box(shape, rows, cols):
    m = np.zeros(shape, bool)
    m[rows[0]:rows[1], cols[0]:cols[1]] = True
    return m


@pytest.fixture
def three_slides(tmp_path):
    """Hand-made outputs and truths; every expected value below is counted by hand."""
    out, truths = tmp_path / "out", tmp_path / "truth"
    out.mkdir(), truths.mkdir()
    # slide a, downsample 1: a 10x10 prediction overlapping a 10x10 truth by 5x5; a 20x20 region found exactly
    pred = _box((64, 64), (0, 10), (0, 10)) | _box((64, 64), (30, 50), (30, 50))
    truth = _box((64, 64), (5, 15), (5, 15)) | _box((64, 64), (30, 50), (30, 50))
    _prediction(out, "a", pred, (64, 64), 1.0)
    _tiff(truths / "a.mask.tif", truth)
    # slide b: nothing predicted, nothing true
    _prediction(out, "b", np.zeros((32, 48), bool), (48, 32), 1.0)
    _tiff(truths / "b.mask.tif", np.zeros((32, 48), bool))
    # slide c, downsample 2, truth as QuPath GeoJSON in level-0 pixels: the square [20, 60)^2 covers grid
    # pixels whose centres (c + 0.5) * 2 lie in it: c = 10..29, 400 pixels; the prediction shares rows 20..29
    _prediction(out, "c", _box((64, 64), (20, 40), (10, 30)), (128, 128), 2.0)
    square = [[20, 20], [60, 20], [60, 60], [20, 60], [20, 20]]
    (truths / "c.geojson").write_text(json.dumps({"type": "Feature", "properties": {},
                                                  "geometry": {"type": "Polygon", "coordinates": [square]}}))
    return out, truths


def test_hand_computed_dice_precision_recall_and_the_xs_xl_split(three_slides):
    out, truths = three_slides
    result = evaluate(out, [truths], small_region_pixels=150)
    rows = {r["slide"]: r for r in result["slides"]}
    a, b, c = rows["a"], rows["b"], rows["c"]
    assert (a["intersection_pixels"], a["predicted_pixels"], a["truth_pixels"]) == (425, 500, 500)
    assert a["dice"] == pytest.approx(0.85) and a["precision"] == pytest.approx(0.85)
    # XS: the 100-px truth region (under 150) against the prediction overlapping it: 2 * 25 / 200
    assert (a["dice_small"], a["dice_large"], a["regions_small"], a["regions_large"]) == (0.25, 1.0, 1, 1)
    assert (b["dice"], b["precision"], b["recall"]) == (1.0, None, None)
    assert (c["truth_kind"], c["intersection_pixels"], c["predicted_pixels"], c["truth_pixels"]) == \
        ("annotations", 200, 400, 400)
    assert (c["dice"], c["dice_large"], c["regions_small"], c["regions_large"]) == (0.5, 0.5, 0, 1)
    s = result["summary"]
    assert s["pooled_dice"] == pytest.approx(2 * 625 / 1800)
    assert s["mean_dice"] == pytest.approx((0.85 + 1.0 + 0.5) / 3)
    # splits with neither truth nor prediction on a slide (b's both, c's XS) are left out of the means
    assert s["mean_dice_small"] == pytest.approx(0.25) and s["mean_dice_large"] == pytest.approx(0.75)

    md = (out / "evaluation.md").read_text()
    assert md == result["markdown"]
    assert "| a | a.mask.tif | 64x64 | 85.00 | 85.00 | 85.00 | 25.00 | 100.00 | 1 / 1 |" in md
    assert "| b | b.mask.tif | 48x32 | 100.00 | n/a | n/a | n/a | n/a | 0 / 0 |" in md
    assert "| ResNet50-GICN-GPP (k = 7) (paper) |" in md and "63.70 | 63.11 | 64.03 |" in md
    assert "the paper's models, on the paper's data" in md
    with open(out / "evaluation.csv") as fh:
        table = list(csv.DictReader(fh))
    assert [r["slide"] for r in table] == ["a", "b", "c", "MEAN", "POOLED"]
    assert float(table[-1]["dice"]) == pytest.approx(2 * 625 / 1800) and table[1]["precision"] == ""
    saved = json.loads((out / "evaluation.json").read_text())
    assert saved["paper"]["table1_camelyon16_dice_percent"]["ResNet50-GICN-GPP (k = 7)"] == 63.70
    assert saved["summary"] == pytest.approx(s)


def test_the_split_on_a_coarser_grid_scales_the_small_region_threshold(tmp_path):
    out, truths = tmp_path / "out", tmp_path / "t"
    out.mkdir(), truths.mkdir()
    # on 128 x 128 with at most 64 x 64 pixels for the split, it runs at 1/2: a 12x12 region is 36 px there
    pred = _box((128, 128), (0, 12), (0, 12)) | _box((128, 128), (40, 80), (40, 80))
    _prediction(out, "s", pred, (128, 128), 1.0)
    _tiff(truths / "s.mask.tif", pred)
    row = evaluate(out, [truths], small_region_pixels=400, max_split_pixels=64 * 64)["slides"][0]
    assert (row["split_factor"], row["small_region_pixels_at_split"]) == (2, 100)
    assert (row["regions_small"], row["regions_large"]) == (1, 1)
    assert (row["dice_small"], row["dice_large"]) == (1.0, 1.0)
    assert row["dice"] == 1.0 and row["truth_pixels"] == 144 + 1600  # pixel counts stay on the full grid


def test_the_command_prints_the_table_and_errors_are_one_line(three_slides, capsys, tmp_path):
    out, truths = three_slides
    assert main(["evaluate", str(out), "--truth", str(truths / "a.mask.tif"), str(truths / "c.geojson")]) == 0
    printed = capsys.readouterr().out
    assert "| a | a.mask.tif |" in printed and "| c | c.geojson |" in printed and "no truth for b" in printed
    for argv, expected in [
        (["evaluate", str(tmp_path), "--truth", str(truths)], "holds no *.tumour_mask.tif"),
        (["evaluate", str(out), "--truth", str(tmp_path / "nope")], "no such file or directory"),
        (["evaluate", str(out), "--truth", str(truths / "a.mask.tif"), str(truths / "c.geojson"),
          str(truths / "c.geojson").replace("truth", "truth2")], "no such file"),
    ]:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("fastgicn evaluate: error: ") and expected in err and err.count("\n") == 1
    other = tmp_path / "other"
    other.mkdir()
    (other / "a.xml").write_text("<ASAP_Annotations/>")
    _tiff(other / "a.mask.tif", np.zeros((8, 8), bool))
    with pytest.raises(ConfigError, match="two truths for slide a"):
        evaluate(out, [other])
    (other / "a.xml").unlink()
    (other / "a.mask.tif").unlink()
    _tiff(other / "zzz.mask.tif", np.zeros((8, 8), bool))
    with pytest.raises(ConfigError, match="no truth matches a prediction by name"):
        evaluate(out, [other])
    _tiff(other / "a.mask.tif", np.zeros((8, 8), bool))
    with pytest.raises(ConfigError, match="must be aligned with the slide's level 0"):
        evaluate(out, [other / "a.mask.tif"])


def test_annotations_need_the_segment_report_to_be_placed(three_slides):
    out, truths = three_slides
    for broken in ('{"slide": {}}', "not json"):  # a report without the placement is no report
        (out / "c.report.json").write_text(broken)
        with pytest.raises(ConfigError, match="no usable segment report beside it"):
            evaluate(out, [truths / "c.geojson"])
    (out / "c.report.json").unlink()
    with pytest.raises(ConfigError, match="no usable segment report beside it"):
        evaluate(out, [truths / "c.geojson"])


def test_dice_agrees_with_the_segment_report_on_a_reduced_read(tmp_path):
    """segment at 0.5 um/px of a 0.25 um/px slide (level 0 reduced 2x) writes its own Dice against the truth
    mask; evaluate, reading the same truth, finds the same counts."""
    from fastgicn.config import TileConfig
    from fastgicn.models import create_model
    from fastgicn.synth import write_synthetic_slide
    from fastgicn.train import save_checkpoint
    from tiny_models import register

    torch.manual_seed(1)
    ckpt = tmp_path / "tiny.pt"
    save_checkpoint(ckpt, create_model(register("eval_test_tiny")),
                    tile_config=TileConfig(tile_size=128, overlap=32, target_mpp=0.5, batch_size=4))
    slide, mask = write_synthetic_slide(tmp_path / "slide.svs", 1536, 1024, seed=2, layout="aperio")
    out = tmp_path / "out"
    assert main(["segment", str(slide), "-o", str(out), "--weights", str(ckpt), "--truth", str(mask),
                 "--no-progress"]) == 0
    report = json.loads((out / "slide.report.json").read_text())
    row = evaluate(out, [mask])["slides"][0]
    d = report["dice"]
    assert (row["intersection_pixels"], row["predicted_pixels"], row["truth_pixels"]) == \
        (d["intersection_pixels"], d["predicted_pixels"], d["truth_pixels"])
    assert row["downsample"] == 2.0 and tuple(row["grid"]) == (768, 512) and d["truth_pixels"] > 0


def test_a_truth_of_another_size_is_refused(tmp_path):
    out, truths = tmp_path / "out", tmp_path / "t"
    out.mkdir(), truths.mkdir()
    _prediction(out, "s", np.zeros((40, 40), bool), (64, 64), 1.0)  # the report says the slide was 64 x 64
    _tiff(truths / "s.mask.tif", np.zeros((64, 64), bool))
    with pytest.raises(ConfigError, match="s.tumour_mask.tif is 40x40 but its truth s.mask.tif is 64x64"):
        evaluate(out, [truths])
