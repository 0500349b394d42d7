"""`fastgicn segment`: the demo path, checkpoints and their tile config, many slides, errors as exit codes."""
import json

import pytest
import tifffile
import torch

from fastgicn.cli import main
from fastgicn.config import TileConfig
from fastgicn.synth import write_synthetic_slide
from fastgicn.train import save_checkpoint
from tiny_models import register


pytestmark = pytest.mark.usefixtures("one_torch_thread")


CLI_TEST_TINY = register("cli_test_tiny")  # tests/tiny_models.py: one convolution, runs in a second


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from fastgicn.models import create_model

    torch.manual_seed(0)
    model = create_model("cli_test_tiny")
    path = tmp_path_factory.mktemp("ck") / "tiny.pt"
    save_checkpoint(path, model, tile_config=TileConfig(tile_size=128, overlap=32, target_mpp=0.5, batch_size=4))
    return path


def report(out, stem):
    return json.loads((out / f"{stem}.report.json").read_text())


def test_demo_makes_a_synthetic_slide_segments_it_with_truth_and_reuses_it(tmp_path, checkpoint, capsys):
    out = tmp_path / "out"
    argv = ["segment", "-o", str(out), "--weights", str(checkpoint), "--demo-size", "2048x1536", "--no-progress"]
    assert main(argv) == 0
    stem = "synthetic_demo_2048x1536_seed0"
    assert (out / f"{stem}.svs").is_file() and (out / f"{stem}.mask.tif").is_file()
    rep = report(out, stem)
    # the checkpoint's tile config is used: 128-pixel tiles at 0.5 um/px. The demo slide is laid out as an
    # Aperio 40x scanner writes it (levels 1/4/16: no 20x level), so level 0 is read and reduced 2x
    assert rep["config"]["tile_size"] == 128 and rep["read"]["mpp"] == 0.5
    assert (rep["read"]["level"], rep["read"]["reduction"], rep["read"]["reader"]) == (0, 2, "direct")
    assert rep["read"]["dimensions"] == [1024, 768]
    with tifffile.TiffFile(out / f"{stem}.tumour_mask.tif") as tf:
        assert tf.pages[0].shape == (768, 1024)
    # Dice counted here: the mask written against the truth's stored 2x level (0.5 um/px, the read's resolution)
    with tifffile.TiffFile(out / f"{stem}.tumour_mask.tif") as tf, tifffile.TiffFile(out / f"{stem}.mask.tif") as tt:
        pred, truth = tf.pages[0].asarray() > 0, tt.pages[1].asarray() > 127
    assert truth.shape == pred.shape and 0 < truth.mean() < 1
    inter, n_pred, n_truth = int((pred & truth).sum()), int(pred.sum()), int(truth.sum())
    d = rep["dice"]
    assert (d["intersection_pixels"], d["predicted_pixels"], d["truth_pixels"]) == (inter, n_pred, n_truth)
    assert d["dice"] == pytest.approx(2 * inter / (n_pred + n_truth) if n_pred + n_truth else 1.0)
    assert rep["dice"]["truth"].endswith(f"{stem}.mask.tif")
    assert rep["model"]["name"] == "cli_test_tiny" and rep["model"]["weights"] == str(checkpoint)
    for suffix in (".tumour_probability.tif", ".tumour_mask.tif", ".tumour.geojson", ".overlay.png"):
        assert (out / f"{stem}{suffix}").stat().st_size > 0
    first = capsys.readouterr()
    assert "Dice" in first.out and "making a synthetic slide" in first.err
    mtime = (out / f"{stem}.svs").stat().st_mtime_ns
    assert main(argv) == 0  # second run: slide reused, outputs complete, nothing redone
    second = capsys.readouterr()
    assert "skipped" in second.out + second.err and "making" not in second.err
    assert (out / f"{stem}.svs").stat().st_mtime_ns == mtime
    # command-line options replace the checkpoint's config, and a new config is a new result
    assert main(argv + ["--tile-size", "64", "--overlap", "0", "--stitch", "blend"]) == 0
    rep = report(out, stem)
    assert rep["config"]["tile_size"] == 64 and rep["config"]["overlap"] == 0 and rep["stitch"] == "blend"


def test_many_slides_one_bad_exit_status_one(tmp_path, checkpoint, capsys):
    a, _ = write_synthetic_slide(tmp_path / "a.svs", 1024, 768, seed=3, min_level_size=256)
    bad = tmp_path / "bad.svs"
    bad.write_bytes(b"not a slide at all")
    out = tmp_path / "out"
    code = main(["segment", str(bad), str(a), "-o", str(out), "--weights", str(checkpoint), "--no-progress",
                 "--level", "0", "--tile-size", "128", "--overlap", "16"])
    captured = capsys.readouterr()
    assert code == 1
    assert "bad.svs: FAILED" in captured.out and "bad.svs" in captured.err
    assert report(out, "a")["read"]["level"] == 0


@pytest.mark.parametrize("extra,message", [
    (["--device", "cuda"] if not torch.cuda.is_available() else ["--tile-size", "30"], "cuda|tile_size"),
    (["--overlap", "7"], "overlap=7"),
    (["--truth", "x.tif", "y.tif"], "2 --truth masks"),
    (["--weights", "missing.pt"], "missing.pt"),
])
def test_errors_are_one_line_and_exit_status_two(tmp_path, checkpoint, capsys, extra, message):
    import re

    argv = ["segment", str(tmp_path / "s.svs"), "-o", str(tmp_path / "out"), "--weights", str(checkpoint)] + extra
    assert main(argv) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # (a note on torch threads may come first on a busy machine)
    assert last.startswith("fastgicn segment: error:") and re.search(message, last, re.IGNORECASE)
    assert "Traceback" not in err


def test_demo_weights_segment_the_synthetic_slide(tmp_path):
    out = tmp_path / "out"
    assert main(["segment", "-o", str(out), "--demo-size", "2048x2048", "--no-progress"]) == 0
    rep = report(out, "synthetic_demo_2048x2048_seed0")
    assert rep["model"]["weights"].endswith("demo_synthetic.pt")
    assert rep["dice"]["dice"] > 0.5  # trained weights find the synthetic tumour


def test_torch_threads_is_set_for_the_run_and_restored(tmp_path, checkpoint, monkeypatch):
    seen = []
    from fastgicn import pipeline

    real = pipeline.segment_slides

    def spy(*a, **k):
        seen.append(torch.get_num_threads())
        return real(*a, **k)

    monkeypatch.setattr(pipeline, "segment_slides", spy)
    a, _ = write_synthetic_slide(tmp_path / "a.svs", 512, 512, seed=3)
    before = torch.get_num_threads()
    assert main(["segment", str(a), "-o", str(tmp_path / "o"), "--weights", str(checkpoint), "--level", "0",
                 "--torch-threads", "1", "--no-progress"]) == 0
    assert seen == [1] and torch.get_num_threads() == before
    assert main(["segment", str(a), "-o", str(tmp_path / "o"), "--torch-threads", "0"]) == 2


def test_missing_truth_mask_is_named_as_the_truth_not_the_slide(tmp_path, checkpoint, capsys):
    slide, _ = write_synthetic_slide(tmp_path / "a.svs", 512, 512, seed=3)
    argv = ["segment", str(slide), "-o", str(tmp_path / "out"), "--weights", str(checkpoint),
            "--truth", str(tmp_path / "nope.tif"), "--no-progress"]
    assert main(argv) == 1
    err = capsys.readouterr()
    assert "truth mask" in err.err and "nope.tif" in err.err


def test_unusable_output_directory_is_refused_before_any_work(tmp_path, checkpoint, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    argv = ["segment", "-o", str(blocker / "out"), "--weights", str(checkpoint), "--no-progress"]
    assert main(argv) == 2
    assert "cannot be created" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]   # no demo slide was written


def test_onnxruntime_backend_gives_the_torch_mask(tmp_path, checkpoint, capsys):
    import tifffile

    slide, _ = write_synthetic_slide(tmp_path / "a.svs", 1024, 768, seed=5, min_level_size=256)
    masks = {}
    for backend in ("torch", "onnxruntime"):
        out = tmp_path / backend
        argv = ["segment", str(slide), "-o", str(out), "--weights", str(checkpoint), "--backend", backend,
                "--no-progress"]
        assert main(argv) == 0
        masks[backend] = tifffile.imread(out / "a.tumour_mask.tif", key=0)
        assert f"backend: {backend}" in capsys.readouterr().err
    assert masks["torch"].shape == masks["onnxruntime"].shape
    assert (masks["torch"] == masks["onnxruntime"]).mean() >= 0.999
