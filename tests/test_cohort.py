"""Everyday cohorts through `fastgicn segment`: names in any script, two slides with one name, slides without
tissue or smaller than a tile, and failures a lab can retry with one command."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import tifffile
import torch
from torch import nn

from fastgicn.cli import main
from fastgicn.config import TileConfig
from fastgicn.models import register_model
from fastgicn.models.registry import list_models
from fastgicn.naming import FAILURES_NAME, tiff_ascii
from fastgicn.synth import write_synthetic_slide
from fastgicn.train import save_checkpoint
from slide_fixtures import APERIO_DESCRIPTION

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Dark(nn.Module):
    """Tumour wherever the pixel is darker than mid-grey: a model whose answer can be checked by hand."""

    def __init__(self):
        super().__init__()
        self.head = nn.Conv2d(3, 2, 1)
        self.mean, self.std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)

    def forward(self, x):
        grey = x.mean(dim=1, keepdim=True)
        return torch.cat([grey - 0.5, 0.5 - grey], dim=1) * 20


if "cohort_test_dark" not in list_models():
    @register_model
    def cohort_test_dark() -> nn.Module:
        return Dark()


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    from fastgicn.models import create_model

    path = tmp_path_factory.mktemp("ck") / "dark.pt"
    save_checkpoint(path, create_model("cohort_test_dark"),
                    tile_config=TileConfig(tile_size=64, overlap=0, level=0, batch_size=4))
    return path


def run(capsys, *argv) -> tuple[int, str]:
    code = main(["segment", *map(str, argv), "--no-progress"])
    cap = capsys.readouterr()
    return code, cap.out + cap.err


def report(out, stem):
    return json.loads((out / f"{stem}.report.json").read_text(encoding="utf-8"))


def svs(path, rgb):
    h, w = rgb.shape[:2]
    with tifffile.TiffWriter(path) as tw:
        tw.write(rgb, tile=(16, 16) if max(h, w) < 64 else (64, 64), photometric="rgb", compression="zlib",
                 description=APERIO_DESCRIPTION.format(w=w, h=h), metadata=None)
    return path


def test_names_in_any_script(tmp_path, weights, capsys):
    src = tmp_path / "in ü 'q'"
    src.mkdir()
    rgb = np.full((384, 512, 3), 240, np.uint8)
    rgb[100:300, 150:400] = (110, 40, 120)          # a dark region: tumour for the Dark model
    slide = svs(src / "Müller_01 🧪.svs", rgb)
    out = tmp_path / "out é"
    code, text = run(capsys, slide, "-o", out, "--weights", weights)
    assert code == 0, text
    stem = "Müller_01 🧪"
    rep = report(out, stem)
    assert rep["slide"]["name"] == stem and rep["slide"]["path"].endswith("Müller_01 🧪.svs")
    for key in ("tumour_probability", "tumour_mask"):
        with tifffile.TiffFile(out / f"{stem}.{key}.tif") as tf:
            desc = tf.pages[0].description
            assert desc.isascii() and tiff_ascii(stem) in desc   # TIFF text is ASCII, the name recoverable
            assert tf.pages[0].shape == (384, 512)
    geo = json.loads((out / f"{stem}.tumour.geojson").read_text(encoding="utf-8"))
    assert len(geo["features"]) == 1 and "Müller_01 🧪.svs" in json.dumps(geo, ensure_ascii=False)
    assert tiff_ascii("Müller_01 🧪") == "Muller_01 \\U0001f9ea"


def test_another_slide_with_the_same_name_is_refused_not_replaced(tmp_path, weights, capsys):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir(), (tmp_path / "c").mkdir()
    first, _ = write_synthetic_slide(tmp_path / "a" / "case.svs", 512, 384, seed=1, min_level_size=128)
    other, _ = write_synthetic_slide(tmp_path / "b" / "case.svs", 512, 384, seed=9, min_level_size=128)
    copy = shutil.copy(first, tmp_path / "c" / "case.svs")
    out = tmp_path / "out"
    assert run(capsys, first, "-o", out, "--weights", weights)[0] == 0
    before = (out / "case.report.json").read_bytes()
    code, text = run(capsys, other, "-o", out, "--weights", weights)
    assert code == 1
    assert str(first.resolve()) in text and str(other.resolve()) in text and "--force" in text
    assert (out / "case.report.json").read_bytes() == before          # the first slide's results are intact
    code, text = run(capsys, copy, "-o", out, "--weights", weights)     # the same slide copied elsewhere
    assert code == 0 and "skipped" in text
    code, text = run(capsys, other, "-o", out, "--weights", weights, "--force")
    assert code == 0 and report(out, "case")["slide"]["path"] == str(other.resolve())


def test_glass_only_slide_warns_and_a_tiny_slide_is_segmented(tmp_path, weights, capsys):
    glass = svs(tmp_path / "glass.svs", np.full((200, 300, 3), 243, np.uint8))
    tiny_rgb = np.full((16, 16, 3), 255, np.uint8)
    tiny_rgb[4:12, 4:12] = (120, 40, 110)            # dark tissue on an 8 x 8 patch: tumour for the Dark model
    tiny = svs(tmp_path / "small.svs", tiny_rgb)
    out = tmp_path / "out"
    code, text = run(capsys, glass, tiny, "-o", out, "--weights", weights)
    assert code == 0, text
    assert "warning: no tissue found in" in text and "glass.svs" in text
    rep = report(out, "glass")
    assert rep["tissue"]["found"] is False and rep["tiles"]["segmented"] == 0
    assert (out / "glass.tumour_mask.tif").is_file()
    assert "2 slides" in text and "2 done (1 without tissue)" in text
    # the 16 x 16 slide: one padded tile, its tissue fraction counted over the 256 real pixels (64 of tissue)
    rep = report(out, "small")
    assert rep["tiles"]["segmented"] == 1 and rep["tissue"]["found"] is True
    with tifffile.TiffFile(out / "small.tumour_mask.tif") as tf:
        mask = tf.pages[0].asarray()
    expect = np.zeros((16, 16), np.uint8)
    expect[4:12, 4:12] = 255
    np.testing.assert_array_equal(mask, expect)


def test_failures_are_listed_and_retried_with_one_command(tmp_path, weights, capsys):
    good, _ = write_synthetic_slide(tmp_path / "good.svs", 512, 384, seed=3, min_level_size=128)
    bad = tmp_path / "bad.svs"
    bad.write_bytes(b"not a slide at all" * 100)
    out = tmp_path / "out"
    code, text = run(capsys, good, bad, "-o", out, "--weights", weights)
    assert code == 1
    manifest = out / FAILURES_NAME
    rows = [line.split("\t") for line in manifest.read_text(encoding="utf-8").splitlines()
            if not line.startswith("#")]
    assert [r[0] for r in rows] == [str(bad)] and "not a format" in rows[0][1] and len(rows[0]) == 3
    assert "2 slides" in text and "1 done" in text and "1 failed" in text and str(manifest) in text
    write_synthetic_slide(bad, 512, 384, seed=4, min_level_size=128)   # the lab fixes the file
    code, text = run(capsys, "--slides-from", manifest, "-o", out, "--weights", weights)
    assert code == 0, text
    assert report(out, "bad")["complete"] and not manifest.exists()


def test_a_new_minimum_region_redoes_the_slide(tmp_path, weights, capsys):
    rgb = np.full((256, 256, 3), 240, np.uint8)
    rgb[40:200, 40:200] = (110, 40, 120)
    slide = svs(tmp_path / "s.svs", rgb)
    out = tmp_path / "out"
    assert run(capsys, slide, "-o", out, "--weights", weights)[0] == 0
    code, text = run(capsys, slide, "-o", out, "--weights", weights)
    assert code == 0 and "skipped" in text
    code, text = run(capsys, slide, "-o", out, "--weights", weights, "--min-region-um2", "1e9")
    assert code == 0 and "skipped" not in text
    assert report(out, "s")["tumour"]["regions"] == 0           # the one region is under a square millimetre
