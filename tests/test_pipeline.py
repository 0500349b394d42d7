"""segment_slide / segment_slides end to end on small slides: geometry, outputs, Dice, skip, resume, bad slides."""
import io
import json
import os
import threading

import numpy as np
import openslide
import pytest
import shapely
import shapely.geometry
import torch
import torch.nn.functional as F
from test_polygons import fill_features
from torch import nn

from fastgicn.config import TileConfig
from fastgicn.demo import DEMO_WEIGHTS
from fastgicn.errors import ConfigError
from fastgicn.models import create_model
from fastgicn.models.metrics import dice_score
from fastgicn.outputs.tiff import write_pyramid
from fastgicn.pipeline import output_paths, outputs_complete, segment_slide, segment_slides
from fastgicn.progress import Progress

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class LocalModel(nn.Module):
    """A purely local 'network': a 3x3 integer convolution of the pixel values (exact in float32), its
    tumour logit a scaled copy. Offsets are half-integers, so no pixel sits exactly at p = 0.5."""

    def __init__(self):
        super().__init__()
        self.mean, self.std = (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)
        self.model_name, self.model_kwargs = "local3x3", {}
        k = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]])
        weight = torch.stack([k, -k, 0.5 * k])[None]  # 1 x 3 x 3 x 3
        self.register_buffer("weight", weight)
        self.calls = self.tiles = 0

    def forward(self, x):
        self.calls += 1
        self.tiles += x.shape[0]
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        v = torch.round((x * std + mean) * 255)  # the exact pixel values again
        z = F.conv2d(v, self.weight, padding=1)
        return torch.cat([torch.zeros_like(z), (z - 950.5) / 128], dim=1)


def tissue_image(h, w, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = 120 + 60 * np.sin(xx / 13.0)[..., None] * np.cos(yy / 17.0)[..., None] * np.array([1.0, 0.6, -0.4])
    return np.clip(base + rng.normal(0, 12, (h, w, 3)), 0, 215).astype(np.uint8)


def whole_image_reference(model, img, extent_w, extent_h):
    padded = np.full((extent_h, extent_w, 3), 255, np.uint8)
    padded[:img.shape[0], :img.shape[1]] = img
    x = torch.from_numpy(padded)[None].permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor(model.mean).view(1, 3, 1, 1)) / torch.tensor(model.std).view(1, 3, 1, 1)
    with torch.no_grad():
        p = torch.softmax(model(x), 1)[0, 1]
    return (p * 255).round().to(torch.uint8).numpy()[:img.shape[0], :img.shape[1]]


def read_tiff(path):
    s = openslide.OpenSlide(str(path))
    try:
        return s, np.asarray(s.read_region((0, 0), 0, s.dimensions))[..., 0].copy()
    finally:
        s.close()


def fastgicn_threads():
    return [t for t in threading.enumerate() if t.name.startswith("fastgicn-")]


@pytest.mark.parametrize("stitch", ["crop", "blend"])
def test_local_model_segments_like_the_whole_image(tmp_path, stitch):
    h, w, tile, overlap = 211, 300, 64, 8  # edge tiles on both axes
    img = tissue_image(h, w)
    model = LocalModel()
    config = TileConfig(tile_size=tile, overlap=overlap, batch_size=3, tissue_prefilter=False,
                        min_tissue_fraction=0.0)
    fds = len(os.listdir("/proc/self/fd"))
    res = segment_slide(img, tmp_path, model, config, name="arr", mpp=0.5, stitch=stitch, threads=2,
                        progress=False, min_region_um2=0)
    assert len(os.listdir("/proc/self/fd")) == fds and not fastgicn_threads()  # no handle or thread left
    seen = model.tiles  # (before the reference below runs the model too)
    stride = tile - overlap
    n_cols, n_rows = 1 + -(-(w - tile) // stride), 1 + -(-(h - tile) // stride)
    ref = whole_image_reference(model, img, (n_cols - 1) * stride + tile, (n_rows - 1) * stride + tile)
    _, prob = read_tiff(res.outputs["probability"])
    assert prob.shape == (h, w)
    diff = np.abs(prob.astype(int) - ref)
    assert diff.max() <= 1 and (diff == 0).mean() > 0.999  # equal up to float rounding of the softmax
    _, mask = read_tiff(res.outputs["mask"])
    np.testing.assert_array_equal(mask, np.where(ref >= 128, 255, 0))
    rep = json.loads(open(res.outputs["report"]).read())
    assert rep == json.loads(json.dumps(res.report))
    # against counts made here: every tile of the grid, none rejected, each one seen by the model
    assert (rep["tiles"]["candidates"], rep["tiles"]["read"], rep["tiles"]["rejected"], rep["tiles"]["segmented"]) \
        == (n_cols * n_rows, n_cols * n_rows, 0, n_cols * n_rows) == (seen, seen, 0, seen)
    assert rep["tumour"]["pixels"] == int((ref >= 128).sum())
    assert rep["tumour"]["area_mm2"] == pytest.approx((ref >= 128).sum() * 0.25 / 1e6)
    assert rep["stitch"] == stitch and rep["config"]["overlap"] == overlap
    for stage in ("open", "tissue", "normalise", "forward", "stitch", "polygons", "overlay", "total"):
        assert rep["seconds"][stage] >= 0
    # small slide: the polygons are traced at full resolution and fill back to exactly the mask
    gj = json.loads(open(res.outputs["geojson"]).read())
    np.testing.assert_array_equal(fill_features(gj["features"], (h, w)), mask > 0)
    assert rep["tumour"]["regions"] == len(gj["features"])
    assert rep["tumour"]["small_regions_dropped"]["dropped"] == 0  # min_region_um2=0 keeps every region
    assert outputs_complete(tmp_path, "arr")


def test_dice_against_a_truth_mask(tmp_path):
    img = tissue_image(128, 160, seed=2)
    model = LocalModel()
    config = TileConfig(tile_size=64, overlap=0, batch_size=4, tissue_prefilter=False, min_tissue_fraction=0.0)
    res = segment_slide(img, tmp_path, model, config, name="a", progress=False)
    _, pred = read_tiff(res.outputs["mask"])
    truth = np.zeros((128, 160), np.uint8)
    truth[20:100, 30:150] = 255
    res = segment_slide(img, tmp_path, model, config, name="a", truth=truth, progress=False)
    assert res.report["dice"]["dice"] == pytest.approx(dice_score(pred > 0, truth > 0))
    assert res.report["tumour"]["area_mm2"] is None  # no MPP known
    with pytest.raises(ConfigError, match="aligned"):
        segment_slide(img, tmp_path, model, config, name="a", truth=truth[:100], progress=False)
    assert not os.path.exists(output_paths(tmp_path, "a")["report"])  # the failed run left no report


def write_slide(path, img, mpp=0.25):
    h, w = img.shape[:2]
    write_pyramid(path, w, h, lambda x, y, ww, hh: img[y:y + hh, x:x + ww], channels=3, tile=128,
                  compression="jpeg", mpp=mpp, aperio=True, min_level_size=128)
    return path


def glass_slide_image(h, w, seed):
    img = np.full((h, w, 3), 242, np.uint8)
    img[h // 4:3 * h // 4, w // 5:3 * w // 5] = tissue_image(3 * h // 4 - h // 4, 3 * w // 5 - w // 5, seed)
    return img


def test_real_network_on_a_slide_file_at_level_1(tmp_path):
    path = write_slide(tmp_path / "s1.svs", glass_slide_image(640, 896, seed=1))
    model = create_model("resnet50_gicn_gpp", width=0.125)
    config = TileConfig(tile_size=64, overlap=16, level=1, batch_size=4)
    res = segment_slide(path, tmp_path / "out", model, config, stitch="blend", progress=False)
    rep = res.report
    assert rep["read"]["level"] == 1 and rep["read"]["dimensions"] == [448, 320]
    assert rep["read"]["mpp"] == pytest.approx(0.5)
    assert 0 < rep["tiles"]["read"] < 8 * 6  # the tissue prefilter left out glass
    assert rep["tissue"]["area_mm2"] == pytest.approx(640 / 2 * 896 * 2 / 5 * 0.25 ** 2 / 1e6, rel=0.15)
    for key in ("probability", "mask"):
        s = openslide.OpenSlide(res.outputs[key])
        try:
            assert s.dimensions == (448, 320)
            assert float(s.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(0.5)
            px = np.asarray(s.read_region((0, 0), 0, (448, 320)))[..., 0]
            if key == "mask":
                assert set(np.unique(px)) <= {0, 255}
            assert (px[:40, :40] == 0).all()  # glass far from tissue is never predicted
        finally:
            s.close()
    gj = json.loads(open(res.outputs["geojson"]).read())
    for f in gj["features"]:  # level-0 coordinates: within the slide, at twice the read level's scale
        xy = shapely.get_coordinates(shapely.geometry.shape(f["geometry"]))
        assert xy[:, 0].max() <= 896 and xy[:, 1].max() <= 640
        assert (xy % 2 == 0).all()
    small = rep["tumour"]["small_regions_dropped"]  # the default filter, by area since the slide has an MPP
    assert small["min_region_um2"] == 100 and "um^2" in small["rule"]
    assert rep["tumour"]["regions"] == len(gj["features"])
    from PIL import Image
    assert Image.open(res.outputs["overlay"]).size == (448, 320)


def test_many_slides_skip_bad_ones_skip_done_ones_and_resume(tmp_path):
    good = [write_slide(tmp_path / f"g{i}.svs", glass_slide_image(256, 320, seed=i)) for i in range(3)]
    bad = tmp_path / "corrupt.svs"
    bad.write_bytes(b"II*\x00" + os.urandom(2000))
    trunc = tmp_path / "truncated.svs"
    trunc.write_bytes(good[0].read_bytes()[:3000])
    out = tmp_path / "out"
    model = LocalModel()
    config = TileConfig(tile_size=64, overlap=0, batch_size=8)
    log = []
    slides = [good[0], bad, good[1], trunc, good[2]]
    results = segment_slides(slides, out, model, config, log=log.append, progress=False)
    assert [r.status for r in results] == ["done", "failed", "done", "failed", "done"]
    assert any("corrupt.svs" in m and "skipped" in m for m in log)
    assert any("truncated.svs" in m and "skipped" in m for m in log)
    assert not any(p.name.startswith(("corrupt", "truncated")) for p in out.iterdir())
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary left behind
    # re-run: everything done is skipped, the model is not called
    model.calls = 0
    results = segment_slides(good, out, model, config, log=log.append, progress=False)
    assert [r.status for r in results] == ["skipped"] * 3 and model.calls == 0
    # a run killed while segmenting g1: its report is gone and a temporary is left; g0 and g2 stay done
    output_paths(out, "g1")["report"].unlink()
    (out / ".g1.tumour_mask.tif.dead.partial").write_bytes(b"half")
    results = segment_slides(good, out, model, config, log=log.append, progress=False)
    assert [r.status for r in results] == ["skipped", "done", "skipped"]
    assert not (out / ".g1.tumour_mask.tif.dead.partial").exists()
    # another config is another result: redone
    results = segment_slides(good[:1], out, model, TileConfig(tile_size=64, overlap=16, batch_size=8),
                             log=log.append, progress=False)
    assert results[0].status == "done"


def test_interrupt_midway_leaves_no_complete_looking_output(tmp_path):
    path = write_slide(tmp_path / "s.svs", glass_slide_image(256, 320, seed=5))

    class Dies(LocalModel):
        def forward(self, x):
            if self.calls >= 1:
                raise KeyboardInterrupt
            return super().forward(x)

    config = TileConfig(tile_size=64, overlap=0, batch_size=2)
    with pytest.raises(KeyboardInterrupt):
        segment_slides([path], tmp_path / "out", Dies(), config, progress=False)
    assert list((tmp_path / "out").iterdir()) == [] and not fastgicn_threads()
    results = segment_slides([path], tmp_path / "out", LocalModel(), config, progress=False, log=lambda m: None)
    assert results[0].status == "done" and outputs_complete(tmp_path / "out", "s")


def test_progress_line():
    buf = io.StringIO()
    bar = Progress(10, "slide", enabled=True, stream=buf, interval=0)
    bar.update(4)
    bar.close()
    assert "4/10 tiles" in buf.getvalue() and "tiles/s" in buf.getvalue() and "ETA" in buf.getvalue()
    silent = io.StringIO()
    Progress(10, "slide", stream=silent).update(3)  # not a terminal: silent by default
    assert silent.getvalue() == ""


def test_a_read_error_midway_leaves_no_thread_handle_or_file(tmp_path):
    from fastgicn.errors import SlideError
    from fastgicn.slide import ImageSlide

    class FailsLater(ImageSlide):
        reads = 0

        def _read(self, out, l0_x, l0_y, level, threshold):
            FailsLater.reads += 1
            if FailsLater.reads > 12:
                raise SlideError("flaky.svs: reading failed halfway (test)")
            return super()._read(out, l0_x, l0_y, level, threshold)

    slide = FailsLater(tissue_image(256, 384, seed=3), name="flaky.svs")
    fds = len(os.listdir("/proc/self/fd"))
    with pytest.raises(SlideError, match="flaky.svs"):
        segment_slide(slide, tmp_path, LocalModel(), TileConfig(tile_size=64, batch_size=2,
                                                               tissue_prefilter=False), progress=False)
    assert list(tmp_path.iterdir()) == []  # TIFF writers aborted, their temporaries removed
    assert not fastgicn_threads() and len(os.listdir("/proc/self/fd")) == fds


def seam_columns(n, tile, overlap, stitch):
    """Indices c of the column pairs (c, c + 1) where a stitched image of width n goes from one tile to the
    next: for crop the pair where it switches, for blend every pair of the overlap (it changes gradually)."""
    stride = tile - overlap
    cols = []
    for s in range(stride, n - 1, stride):
        if s + overlap >= n - 1:
            continue
        cols.extend([s + overlap // 2 - 1] if stitch == "crop" or overlap == 0 else range(s, s + overlap))
    return np.array(cols)


@pytest.mark.skipif(not DEMO_WEIGHTS.is_file(), reason="needs the trained demo weights (a random network "
                                                        "predicts a near constant, with or without seams)")
def test_trained_network_disagrees_across_tile_borders_no_more_than_inside_tiles(tmp_path):
    """Seams, measured on a tumour edge at the demo weights' resolution (0.5 um/px, 256-pixel tiles): the
    mean |difference| between neighbouring pixels across the tile borders of one tiling, against the same
    pixel pairs in a second tiling shifted by half a stride, where they lie inside tiles (same content, so
    edges of the tumour count the same in both).

    Measured on this slide: no overlap 11x; crop with overlap 32, 1.2x and with 64, 1.45x (a faint seam: the
    GPP branch pools each whole tile, so each tile's context shows); blend with overlap 32, 0.95x and with 64,
    0.93x: no seam. Hence blend is the default; this test checks the demo weights' overlap (32)."""
    from fastgicn.synth import SyntheticSlide
    from fastgicn.train import model_from_checkpoint

    model = model_from_checkpoint(DEMO_WEIGHTS)
    ds, tile = 2, 256
    synthetic = SyntheticSlide(6000, 6000, seed=21)
    _, truth = synthetic.render(0, 0, 6000 // 16, 6000 // 16, downsample=16)
    ys, xs = np.nonzero(truth)
    row = int(np.median(ys))
    cy, cx = row * 16 + 8, int(xs[ys == row].max()) * 16 + 8  # the right edge of a tumour, mid-height
    side = 640
    img, mask = synthetic.render(cx - side * ds // 2, cy - side * ds // 2, side, side, downsample=ds)
    assert 0.1 < (mask > 0).mean() < 0.9
    base = dict(tile_size=tile, batch_size=3, tissue_prefilter=False, white_threshold=255)
    ratio = {}
    for overlap, stitch in ((0, "crop"), (32, "blend")):
        h = (tile - overlap) // 2
        probs = []
        for shift in (0, h):
            res = segment_slide(np.ascontiguousarray(img[shift:, shift:]), tmp_path, model,
                                TileConfig(overlap=overlap, **base), name=f"{stitch}{overlap}_{shift}",
                                stitch=stitch, progress=False)
            _, p = read_tiff(res.outputs["probability"])
            assert ((p >= 128) == (mask[shift:, shift:] > 0)).mean() > 0.9  # the weights find the tumour
            probs.append(np.pad(p.astype(float), ((shift, 0), (shift, 0)), constant_values=np.nan))
        a, b = probs  # a: tiles from 0; b: shifted, its tiles' insides where a's borders are
        cols = seam_columns(side, tile, overlap, stitch)
        cols = cols[cols > h + 4]  # pixel pairs that both tilings cover
        across = [np.abs(np.diff(q[h:], axis=1))[:, cols].mean() for q in (a, b)]
        down = [np.abs(np.diff(q[:, h:], axis=0))[cols, :].mean() for q in (a, b)]
        ratio[stitch, overlap] = (across[0] + down[0]) / (across[1] + down[1])
    assert ratio["blend", 32] <= 1.15  # no seam
    assert ratio["crop", 0] > 4  # and the measure does see seams when there are some
