"""Tests that fail on the one-line bugs the rest of the suite let through (issue 10). Each checks the library
against a reference made here, never against its own output:

- a level-1 read and a read reduced 2x (`target_mpp`) against the model run on the whole level-1 image at once
  (a purely local model, so the tiling must not show), with the mask, tumour area, GeoJSON areas in level-0
  microns and Dice against a level-0 truth mask checked by counting pixels here;
- the report's tile counts against tiles counted here, for `white_threshold` and `min_tissue_fraction` values
  that change which tiles are kept, with the batches and tiles the model itself saw;
- the tissue prefilter's candidates against the tiles touching the tissue grown by one mask pixel;
- the X and Y resolution of every level of the output TIFFs;
- resume: another config, stitch mode or slide content (of the same size) is redone or refused, a truncated
  output is redone, also after a real `kill -9` of a `fastgicn segment` process in the middle of writing;
- `fastgicn train` (the checkpoint's tile config and metrics, also after --resume, read back by `segment`),
  `fastgicn synth` and `fastgicn models` end to end.

tests/mutation_check.py applies the bugs these were written against to a copy of the repository and runs
the tests named there."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import shapely
import shapely.geometry
import tifffile
import torch
import torch.nn.functional as F
from slide_fixtures import APERIO_DESCRIPTION, halve
from slide_fixtures import write_pyramid as write_fixture_pyramid
from torch import nn

from fastgicn import TileConfig, segment_slide
from fastgicn.cli import main
from fastgicn.naming import slide_identity
from fastgicn.pipeline import outputs_complete, segment_slides
from fastgicn.slide import open_slide, tissue_mask

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------------------------------------------
# models whose answer is known without running the pipeline

class Local3x3(nn.Module):
    """A 3x3 integer convolution of the exact pixel values (exact in float32) as the tumour logit; offsets are
    half-integers, so no pixel lands on p = 0.5. Records the shape of every batch it is given."""

    def __init__(self):
        super().__init__()
        self.mean, self.std = (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)
        self.model_name, self.model_kwargs = "local3x3_mutations", {}
        k = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]])
        self.register_buffer("weight", torch.stack([k, -k, 0.5 * k])[None])
        self.shapes: list[tuple[int, ...]] = []

    def forward(self, x):
        self.shapes.append(tuple(x.shape))
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        v = torch.round((x * std + mean) * 255)
        z = F.conv2d(v, self.weight, padding=1)
        return torch.cat([torch.zeros_like(z), (z - 950.5) / 128], dim=1)


class Everywhere(nn.Module):
    """p(tumour) = 0.73 wherever a tile is segmented: the mask is the map of kept tiles. Records batch shapes."""

    def __init__(self):
        super().__init__()
        self.mean, self.std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
        self.model_name, self.model_kwargs = "everywhere_mutations", {}
        self.register_buffer("bias", torch.tensor([0.0, 1.0]))
        self.shapes: list[tuple[int, ...]] = []

    def forward(self, x):
        self.shapes.append(tuple(x.shape))
        return self.bias.view(1, 2, 1, 1).expand(x.shape[0], 2, x.shape[2], x.shape[3]) + 0 * x[:, :2]


def whole_image_reference(model, img, extent_w, extent_h):
    """The model on the whole image at once (padded with white to the tile grid's extent), as uint8."""
    padded = np.full((extent_h, extent_w, 3), 255, np.uint8)
    padded[:img.shape[0], :img.shape[1]] = img
    x = torch.from_numpy(padded)[None].permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor(model.mean).view(1, 3, 1, 1)) / torch.tensor(model.std).view(1, 3, 1, 1)
    with torch.no_grad():
        p = torch.softmax(model(x), 1)[0, 1]
    model.shapes.clear()
    return (p * 255).round().to(torch.uint8).numpy()[:img.shape[0], :img.shape[1]]


def tissue_image(h, w, seed=0):
    """Textured tissue colours everywhere (nothing is glass at the default threshold)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = 120 + 60 * np.sin(xx / 13.0)[..., None] * np.cos(yy / 17.0)[..., None] * np.array([1.0, 0.6, -0.4])
    return np.clip(base + rng.normal(0, 12, (h, w, 3)), 0, 215).astype(np.uint8)


def level0(path) -> np.ndarray:
    with tifffile.TiffFile(path) as tf:
        return tf.pages[0].asarray()


def grid_count(extent, tile, stride):
    return 1 + -(-(extent - tile) // stride)


# ---------------------------------------------------------------------------------------------------
# a level-1 read, and level 0 reduced 2x, against the whole level-1 image

H0, W0, MPP0 = 424, 520, 0.25  # level 1 is 260 x 212 at 0.5 um/px


@pytest.fixture(scope="module")
def pyramid(tmp_path_factory):
    """A lossless two-level SVS: level 1 is exactly the 2 x 2 mean of level 0 (stored, deflate)."""
    path = tmp_path_factory.mktemp("pyr") / "two_levels.svs"
    img0 = tissue_image(H0, W0, seed=4)
    arrays = write_fixture_pyramid(path, img0, levels=2, svs=True)
    assert np.array_equal(arrays[1], halve(img0))
    return path, img0


@pytest.mark.parametrize("source,stitch", [("level1", "crop"), ("level1", "blend"), ("reduced", "crop")])
def test_level1_and_reduced_reads_equal_the_model_on_the_whole_level1_image(pyramid, tmp_path, source, stitch):
    path, img0 = pyramid
    img1 = halve(img0)                      # what a level-1 read and a 2x box mean of level 0 both are
    h1, w1 = img1.shape[:2]
    tile, overlap = 64, 8
    model = Local3x3()
    base = {"tile_size": tile, "overlap": overlap, "batch_size": 3, "tissue_prefilter": False,
            "min_tissue_fraction": 0.0}
    if source == "level1":
        slide, config = path, TileConfig(level=1, **base)
    else:                                   # one stored level: 0.5 um/px is level 0 reduced 2x
        slide, config = img0, TileConfig(target_mpp=2 * MPP0, **base)
    ref = whole_image_reference(model, img1, (grid_count(w1, tile, tile - overlap) - 1) * (tile - overlap) + tile,
                                (grid_count(h1, tile, tile - overlap) - 1) * (tile - overlap) + tile)
    pred = ref >= 128
    # a level-0 truth mask: the expected prediction blown up 2x, with a block flipped (on even pixels, so its
    # 2 x 2 reduction is exact): Dice counted here at level 1
    flip0 = np.zeros((H0, W0), bool)
    flip0[100:260, 60:300] = True
    truth0 = np.repeat(np.repeat(pred, 2, axis=0), 2, axis=1) ^ flip0
    truth1 = pred ^ flip0[::2, ::2]
    res = segment_slide(slide, tmp_path, model, config, name="s", mpp=MPP0 if source == "reduced" else None,
                        stitch=stitch, threads=2, progress=False, min_region_um2=0,
                        truth=np.where(truth0, 255, 0).astype(np.uint8))
    rep = res.report
    assert rep["read"]["dimensions"] == [w1, h1] and rep["read"]["mpp"] == pytest.approx(2 * MPP0)
    assert (rep["read"]["level"], rep["read"]["reduction"]) == ((1, 1) if source == "level1" else (0, 2))
    prob = level0(res.outputs["probability"])
    assert prob.shape == (h1, w1)
    diff = np.abs(prob.astype(int) - ref)
    assert diff.max() <= 1 and (diff == 0).mean() > 0.999   # equal up to float rounding of the softmax
    mask = level0(res.outputs["mask"])
    np.testing.assert_array_equal(mask, np.where(pred, 255, 0))
    n_tiles = grid_count(w1, tile, tile - overlap) * grid_count(h1, tile, tile - overlap)
    assert (rep["tiles"]["candidates"], rep["tiles"]["read"], rep["tiles"]["rejected"],
            rep["tiles"]["segmented"]) == (n_tiles, n_tiles, 0, n_tiles)
    assert sum(s[0] for s in model.shapes) == n_tiles and {s[1:] for s in model.shapes} == {(3, tile, tile)}
    assert rep["tumour"]["pixels"] == int(pred.sum())
    assert rep["tumour"]["area_mm2"] == pytest.approx(pred.sum() * (2 * MPP0) ** 2 / 1e6)
    # Dice against the level-0 truth, read at the output's resolution
    d = rep["dice"]
    inter, n_pred, n_truth = int((pred & truth1).sum()), int(pred.sum()), int(truth1.sum())
    assert (d["intersection_pixels"], d["predicted_pixels"], d["truth_pixels"]) == (inter, n_pred, n_truth)
    assert d["dice"] == pytest.approx(2 * inter / (n_pred + n_truth))
    # polygons in level-0 pixels: they cover exactly the level-1 mask's pixels, areas in level-0 microns
    with open(res.outputs["geojson"], encoding="utf-8") as fh:
        gj = json.load(fh)
    geoms = [shapely.geometry.shape(f["geometry"]) for f in gj["features"]]
    assert len(geoms) == rep["tumour"]["regions"] > 1
    yy, xx = np.mgrid[0:h1, 0:w1]
    covered = np.zeros((h1, w1), bool)
    for g in geoms:
        covered |= shapely.contains_xy(g, 2 * xx + 1.0, 2 * yy + 1.0)
    np.testing.assert_array_equal(covered, pred)
    for f, g in zip(gj["features"], geoms):
        assert f["properties"]["measurements"]["Area µm^2"] == pytest.approx(g.area * MPP0 ** 2, rel=1e-6)
    assert sum(g.area for g in geoms) == pytest.approx(4 * pred.sum())   # level-0 pixels


# ---------------------------------------------------------------------------------------------------
# tile counts, white_threshold, min_tissue_fraction, batch_size, tile_size

TISSUE, GLASS = (150, 90, 170), 235     # GLASS is background at threshold 220, tissue at 240


def graded_tiles(rows=4, cols=6, tile=64):
    """Tiles with a tissue band of 0, 6, 16, 38 or 64 rows (of 64) on glass, or pure white (255)."""
    img = np.full((rows * tile, cols * tile, 3), GLASS, np.uint8)
    kinds = [0, 6, 16, 38, 64, "white"]
    for t in range(rows * cols):
        r, c = divmod(t, cols)
        kind = kinds[(t + r) % len(kinds)]
        block = img[r * tile:(r + 1) * tile, c * tile:(c + 1) * tile]
        if kind == "white":
            block[...] = 255
        else:
            block[:kind] = TISSUE
    return img


@pytest.mark.parametrize("white_threshold,min_tissue_fraction", [(220, 0.5), (240, 0.5), (220, 0.0), (240, 0.0)])
def test_report_counts_equal_the_tiles_counted_here(tmp_path, white_threshold, min_tissue_fraction):
    tile, batch = 64, 5
    img = graded_tiles(tile=tile)
    rows, cols = img.shape[0] // tile, img.shape[1] // tile
    kept = np.zeros((rows, cols), bool)
    for r in range(rows):
        for c in range(cols):
            px = img[r * tile:(r + 1) * tile, c * tile:(c + 1) * tile]
            tissue = tile * tile - int((px > white_threshold).all(axis=2).sum())
            kept[r, c] = tissue > 0 if min_tissue_fraction == 0 else tissue >= min_tissue_fraction * tile * tile
    assert 0 < kept.sum() < kept.size
    model = Everywhere()
    config = TileConfig(tile_size=tile, overlap=0, level=0, batch_size=batch, tissue_prefilter=False,
                        white_threshold=white_threshold, min_tissue_fraction=min_tissue_fraction)
    res = segment_slide(img, tmp_path, model, config, name="g", threads=2, progress=False)
    t = res.report["tiles"]
    n = int(kept.sum())
    assert (t["candidates"], t["read"], t["rejected"], t["segmented"]) == (kept.size, kept.size, kept.size - n, n)
    seen = [s[0] for s in model.shapes]   # what reached the network: batches of batch_size, but the 2 readers
    # racing for the last tiles may each hand over a short one (seen: [4, 4] for 8 tiles in batches of 5)
    assert sum(seen) == n and max(seen) <= batch and sum(s < batch for s in seen) <= 2, seen
    assert len(seen) <= -(-n // batch) + 1, seen
    assert {s[1:] for s in model.shapes} == {(3, tile, tile)}
    mask = level0(res.outputs["mask"])                  # 255 exactly on the kept tiles
    np.testing.assert_array_equal(mask, np.where(np.kron(kept, np.ones((tile, tile), bool)), 255, 0))
    assert res.report["tissue"]["found"] is True


def test_prefilter_candidates_are_the_tiles_touching_the_tissue_grown_by_one_mask_pixel(tmp_path):
    tile = 64
    img = np.full((4 * tile, 6 * tile, 3), 240, np.uint8)
    x0, x1, y0, y1 = 128, 192, 64, 192                 # tissue: exactly tiles (1, 2) and (2, 2)
    img[y0:y1, x0:x1] = (200, 100, 150)
    with open_slide(img) as s:
        tm = tissue_mask(s)
    expect_mask = np.zeros(img.shape[:2], bool)
    expect_mask[y0:y1, x0:x1] = True
    assert tm.downsample == 1 and np.array_equal(tm.mask, expect_mask)   # the premise: the mask is the block
    g = tm.downsample                                   # one mask pixel, in level-0 pixels
    touching = [(r, c) for r in range(4) for c in range(6)
                if c * tile < x1 + g and (c + 1) * tile > x0 - g and r * tile < y1 + g and (r + 1) * tile > y0 - g]
    assert len(touching) == 12
    for prefilter, candidates in ((True, len(touching)), (False, 24)):
        model = Everywhere()
        config = TileConfig(tile_size=tile, overlap=0, level=0, batch_size=4, tissue_prefilter=prefilter)
        res = segment_slide(img, tmp_path, model, config, name=f"p{prefilter}", threads=1, progress=False)
        t = res.report["tiles"]
        assert (t["candidates"], t["read"], t["segmented"]) == (candidates, candidates, 2), prefilter
        assert sum(s[0] for s in model.shapes) == 2


# ---------------------------------------------------------------------------------------------------
# the output TIFFs' resolution tags, X and Y apart

def test_output_tiffs_carry_x_and_y_resolution_of_every_level(tmp_path):
    h, w, mpp = 700, 1101, 0.5           # an odd width: the reduced levels' x and y scales differ
    img = tissue_image(h, w, seed=6)
    config = TileConfig(tile_size=256, overlap=0, level=0, batch_size=4, tissue_prefilter=False)
    res = segment_slide(img, tmp_path, Everywhere(), config, name="r", mpp=mpp, threads=2, progress=False)
    for key in ("probability", "mask"):
        with tifffile.TiffFile(res.outputs[key]) as tf:
            pages = [p for p in tf.pages if p.is_tiled]
            assert len(pages) >= 2
            for p in pages:
                assert p.tags["ResolutionUnit"].value == tifffile.RESUNIT.CENTIMETER
                (xn, xd), (yn, yd) = p.tags["XResolution"].value, p.tags["YResolution"].value
                # pixels per cm of this level: level-0 pixels per cm times the level's share of the side
                assert xn / xd == pytest.approx(1e4 / mpp * p.imagewidth / w, rel=1e-7), (key, p.index)
                assert yn / yd == pytest.approx(1e4 / mpp * p.imagelength / h, rel=1e-7), (key, p.index)
    with open_slide(res.outputs["mask"]) as s:
        assert s.mpp_xy == pytest.approx((mpp, mpp))


# ---------------------------------------------------------------------------------------------------
# resume: what decides that existing outputs are kept

def write_raw_svs(path, rgb):
    """An uncompressed two-level SVS: its size in bytes depends only on its dimensions."""
    h, w = rgb.shape[:2]
    with tifffile.TiffWriter(path) as tw:
        tw.write(rgb, tile=(256, 256), photometric="rgb", compression=None, metadata=None,
                 description=APERIO_DESCRIPTION.format(w=w, h=h))
        tw.write(halve(rgb), tile=(256, 256), photometric="rgb", compression=None, metadata=None, subfiletype=1)
    return path


def glass_with_tissue(h, w, seed):
    img = np.full((h, w, 3), 240, np.uint8)
    img[h // 4:3 * h // 4, w // 5:4 * w // 5] = tissue_image(3 * h // 4 - h // 4, 4 * w // 5 - w // 5, seed)
    return img


def test_resume_redoes_another_config_stitch_or_slide_and_a_truncated_output(tmp_path):
    slide = write_raw_svs(tmp_path / "case.svs", glass_with_tissue(192, 256, seed=1))
    out = tmp_path / "out"
    config = TileConfig(tile_size=64, overlap=0, level=0, batch_size=8)
    model = Local3x3()
    quiet = {"log": lambda m: None, "progress": False, "threads": 1}

    def status(**kw):
        model.shapes.clear()
        args = {"config": config, "stitch": "crop", **kw}
        r = segment_slides([slide], out, model, args.pop("config"), **args, **quiet)[0]
        assert r.status == "failed" or (r.status == "skipped") == (not model.shapes)  # skipped: the model never ran
        return r

    assert status().status == "done"
    assert status().status == "skipped"
    assert status(stitch="blend").status == "done"            # another stitch mode is another result
    assert status(stitch="blend").status == "skipped"
    assert status(config=TileConfig(tile_size=64, overlap=16, level=0, batch_size=8), stitch="blend").status == "done"
    assert status(stitch="blend").status == "done"            # and back
    # an output cut short (a copy interrupted, a disk error) is not a complete output
    stem_mask = out / "case.tumour_mask.tif"
    stem_mask.write_bytes(stem_mask.read_bytes()[:-64])
    assert not outputs_complete(out, "case")
    assert status(stitch="blend").status == "done" and outputs_complete(out, "case")
    # the slide replaced by another one of exactly the same size: not the same slide
    before = slide.stat().st_size
    write_raw_svs(slide, glass_with_tissue(192, 256, seed=2))
    assert slide.stat().st_size == before
    r = status(stitch="blend")
    assert r.status == "failed" and "--force" in r.error and str(slide.resolve()) in r.error
    r = status(stitch="blend", force=True)
    assert r.status == "done" and r.report["slide"]["identity"] == slide_identity(slide)
    assert status(stitch="blend").status == "skipped"


KILL_SCRIPT = textwrap.dedent("""
    from fastgicn.config import TileConfig
    from tiny_models import main_with_checkpoint

    main_with_checkpoint("kill9_test_slow", TileConfig(tile_size=64, overlap=0, level=0, batch_size=4))
""")



def test_kill_9_mid_write_then_the_rerun_redoes_the_unfinished_and_the_truncated(tmp_path):
    script = tmp_path / "run_fastgicn.py"
    script.write_text(KILL_SCRIPT)
    first = write_raw_svs(tmp_path / "first.svs", glass_with_tissue(256, 256, seed=3))
    second = write_raw_svs(tmp_path / "second.svs", glass_with_tissue(1024, 1024, seed=4))
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([os.path.dirname(os.path.abspath(__file__)), os.environ.get("PYTHONPATH", "")])}
    ckpt = tmp_path / "slow.pt"
    subprocess.run([sys.executable, str(script), "make", str(ckpt)], check=True, env=env, timeout=120)
    argv = [sys.executable, str(script), "segment", str(first), str(second), "-o", str(out), "--weights",
            str(ckpt), "--torch-threads", "1", "--threads", "1", "--no-progress"]
    proc = subprocess.Popen(argv, env={**env, "FASTGICN_TEST_SLOW": "0.3"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not any(p.name.startswith(".second.") for p in (out.iterdir() if out.is_dir() else [])):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the second slide's outputs were never being written"
            time.sleep(0.05)
        time.sleep(1.0)                           # a few batches (of ~20) into the second slide
        assert proc.poll() is None, "the second slide finished before it could be killed"
        proc.send_signal(signal.SIGKILL)          # no handler runs: what a power cut or the OOM killer leaves
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    left = sorted(p.name for p in out.iterdir())
    assert any(n.startswith(".second.") for n in left), left             # killed mid-write: partial files
    assert "second.report.json" not in left and outputs_complete(out, "first")
    assert not outputs_complete(out, "second")
    prob = out / "first.tumour_probability.tif"                          # damage a finished output
    prob.write_bytes(prob.read_bytes()[:-100])
    assert not outputs_complete(out, "first")
    again = subprocess.run(argv, env=env, timeout=300, capture_output=True, text=True, check=False)
    assert again.returncode == 0, again.stderr
    assert "outputs complete" not in again.stderr                        # neither slide was skipped
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []
    for stem in ("first", "second"):
        assert outputs_complete(out, stem)
        rep = json.loads((out / f"{stem}.report.json").read_text())
        for info in rep["outputs"].values():
            assert (out / info["file"]).stat().st_size == info["bytes"]
    with tifffile.TiffFile(out / "second.tumour_mask.tif") as tf:
        assert tf.pages[0].shape == (1024, 1024)


# ---------------------------------------------------------------------------------------------------
# the train, synth and models commands end to end

TRAIN = ["train", "--synthetic", "1", "--synthetic-size", "512x512", "--patch-size", "64", "--downsample", "2",
         "--batch-size", "2", "--width", "0.0625", "--eval-every", "1", "--log-every", "1",
         "--checkpoint-every", "0", "--schedule", "constant", "--lr", "0.01", "--seed", "3"]


def test_train_then_resume_then_segment_with_the_checkpoint(tmp_path, capsys):
    from fastgicn.train import load_checkpoint

    assert main(TRAIN + ["--iterations", "2", "-o", str(tmp_path / "a")]) == 0
    first = load_checkpoint(tmp_path / "a" / "last.pt")
    # patches were read at downsample 2 of a 0.25 um/px slide: segment must read at 0.5 um/px
    tc = first["tile_config"]
    assert (tc["tile_size"], tc["target_mpp"], tc["level"]) == (64, pytest.approx(0.5), None)
    assert first["iteration"] == 2 and [m["iteration"] for m in first["metrics"]] == [1, 2]
    assert all(0 <= m["dice"] <= 1 and m["patches"] > 0 for m in first["metrics"])
    assert main(TRAIN + ["--iterations", "3", "--resume", str(tmp_path / "a" / "last.pt"),
                         "-o", str(tmp_path / "b")]) == 0
    resumed = load_checkpoint(tmp_path / "b" / "last.pt")
    assert resumed["iteration"] == 3 and [m["iteration"] for m in resumed["metrics"]] == [1, 2, 3]
    assert resumed["metrics"][:2] == first["metrics"]       # the history comes along
    assert "resumed from" in capsys.readouterr().out
    # the checkpoint drives segment: its tile size and resolution
    assert main(["synth", str(tmp_path / "s.svs"), "--size", "512x384", "--seed", "5"]) == 0
    assert main(["segment", str(tmp_path / "s.svs"), "-o", str(tmp_path / "out"), "--weights",
                 str(tmp_path / "b" / "last.pt"), "--no-progress"]) == 0
    rep = json.loads((tmp_path / "out" / "s.report.json").read_text())
    assert rep["config"]["tile_size"] == 64 and rep["read"]["mpp"] == pytest.approx(0.5)
    assert rep["read"]["dimensions"] == [256, 192] and rep["model"]["weights"].endswith("last.pt")


def test_synth_writes_the_slide_and_mask_the_renderer_draws(tmp_path, capsys):
    from fastgicn.synth import SyntheticSlide

    for name, layout, levels in (("a.svs", "aperio", [(1200, 900), (300, 225)]),
                                 ("b.tif", "pow2", [(1200, 900), (600, 450)])):
        path = tmp_path / name
        assert main(["synth", str(path), "--size", "1200x900", "--seed", "3", "--mpp", "0.5",
                     "--layout", layout]) == 0
        mask_path = path.with_name(path.stem + ".mask.tif")
        assert str(path) in capsys.readouterr().out and mask_path.is_file()
        rgb, truth = SyntheticSlide(1200, 900, seed=3, mpp=0.5).render(0, 0, 1200, 900)
        with open_slide(path) as s:
            assert [tuple(d) for d in s.level_dimensions[:2]] == levels
            assert s.mpp == pytest.approx(0.5)
            got = s.read_region(0, 0, 0, 1200, 900)
        assert np.abs(got.astype(int) - rgb).mean() < 3                  # JPEG of the rendered pixels
        with open_slide(mask_path) as m:
            assert m.dimensions == (1200, 900) and m.mpp == pytest.approx(0.5)
            np.testing.assert_array_equal(m.read_region(0, 0, 0, 1200, 900)[..., 0], truth)
        assert 0 < (truth > 0).mean() < 1


def test_models_prints_every_paper_model_with_its_parameter_count(capsys):
    from fastgicn.models import create_model
    from fastgicn.models.gicn import GICN

    assert main(["models", "--side", "64"]) == 0
    text = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in text.splitlines() if line.strip()}

    def count(module):
        return sum(p.numel() for p in module.parameters())

    for name in ("resnet50_gicn", "resnet50_gpp", "resnet50_gicn_gpp"):
        with torch.device("meta"):
            model = create_model(name)
        assert rows[name][1] == f"{count(model) / 1e6:.2f}M", rows[name]
        assert rows[name][2] == f"{(count(model) - count(model.backbone)) / 1e3:.0f}K", rows[name]
    # Table 3: the GICNs of ResNet50-GICN, counted on the modules themselves
    for k in (3, 7, 11):
        with torch.device("meta"):
            model = create_model("resnet50_gicn", k=k)
        gicns = [m for m in model.modules() if isinstance(m, GICN)]
        assert len(gicns) == 4
        assert rows[str(k)][1] == f"{sum(count(g) for g in gicns) / 1e3:.0f}K", rows[str(k)]
