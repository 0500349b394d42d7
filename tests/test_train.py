"""The trainer: paper schedules by hand, balanced sampling, augmentation that keeps labels aligned,
checkpoints that round-trip and resume bit-exactly."""
import numpy as np
import pytest
import torch

from fastgicn.config import TileConfig
from fastgicn.errors import ConfigError
from fastgicn.models import create_model
from fastgicn.train import (PatchDataset, Trainer, TrainConfig, augment, is_glass, load_checkpoint, make_schedule,
                            model_from_checkpoint, save_checkpoint)
from train_helpers import striped_source, tiny_config


def test_paper_schedules_by_hand():
    cam = make_schedule("camelyon16")
    assert cam(0) == 5e-4 and cam(9_999) == 5e-4
    assert cam(10_000) == pytest.approx(5e-4 * 0.98) and cam(25_000) == pytest.approx(5e-4 * 0.98 ** 2)
    gastric = make_schedule("gastric")
    assert [gastric(i) for i in (0, 379_999, 380_000, 459_999, 460_000)] == [1e-4, 1e-4, 1e-5, 1e-5, 1e-6]
    assert gastric.total_iterations == 500_000
    with pytest.raises(ConfigError, match="--lr"):
        make_schedule("constant")
    with pytest.raises(ConfigError, match="unknown schedule"):
        make_schedule("cosine")


def test_glass_rule_is_strictly_above_220():
    assert is_glass(np.full((4, 4, 3), 221, np.uint8))
    tile = np.full((4, 4, 3), 221, np.uint8)
    tile[2, 1, 0] = 220                     # one pixel not above 220 in one channel keeps the tile
    assert not is_glass(tile)


def test_dataset_keeps_tissue_patches_and_balances_positives():
    ds = PatchDataset([striped_source()], size=32, positive_fraction=0.75)
    assert len(ds) == 8 * 6                  # 8 x 8 grid, first two columns are glass
    assert len(ds.positive) == 24 and len(ds.negative) == 24
    picks = ds.sample_indices(4000, torch.Generator().manual_seed(0))
    share = np.isin(picks, ds.positive).mean()
    assert abs(share - 0.75) < 0.03


def test_augmentation_moves_labels_with_pixels():
    g = torch.Generator().manual_seed(3)
    images = torch.rand(6, 3, 16, 16, generator=g)
    labels = (images[:, 0] > 0.5).long()      # the label is a function of the pixel itself
    out, out_labels = augment(images, labels, g, colour_jitter=0.0)
    assert torch.equal((out[:, 0] > 0.5).long(), out_labels)
    assert not torch.equal(out, images)       # something moved


def test_resume_from_a_checkpoint_is_exact(tmp_path):
    ds = PatchDataset([striped_source()], size=64, cache=True)
    straight = Trainer(tiny_config(), ds, log=lambda s: None)
    straight.fit(4)

    first = Trainer(tiny_config(), ds, out_dir=tmp_path, log=lambda s: None)
    first.fit(2)
    resumed = Trainer(tiny_config(), ds, log=lambda s: None)
    resumed.resume(tmp_path / "last.pt")
    assert resumed.iteration == 2
    resumed.fit(4)
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_checkpoint_round_trip_rebuilds_the_model(tmp_path):
    torch.manual_seed(0)
    model = create_model("resnet50_gicn", k=5, width=0.0625).eval()
    path = save_checkpoint(tmp_path / "m.pt", model, tile_config=TileConfig(tile_size=256), iteration=3)
    payload = load_checkpoint(path)
    assert payload["model_name"] == "resnet50_gicn" and payload["model_kwargs"] == {"k": 5, "width": 0.0625}
    assert payload["tile_config"]["tile_size"] == 256 and payload["normalization"]["mean"] == list(model.mean)
    rebuilt = model_from_checkpoint(path)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), rebuilt(x))
    assert not list(tmp_path.glob(".*tmp"))


def test_bad_checkpoints_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="missing.pt"):
        load_checkpoint(tmp_path / "missing.pt")
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"\x80\x02not a checkpoint")
    with pytest.raises(ConfigError, match="broken.pt"):
        load_checkpoint(broken)


@pytest.mark.slow
def test_small_model_learns_synthetic_tumour_to_dice_above_0_8():
    """Evidence that the trainer learns: a width-1/8 ResNet50-GICN-GPP on CPU, held-out synthetic slide."""
    from fastgicn.synth import SyntheticSlide
    from fastgicn.train import SyntheticSource, evaluate_dice

    def patches(seeds):
        return PatchDataset([SyntheticSource(SyntheticSlide(2048, 2048, seed=s)) for s in seeds], size=64,
                            downsample=2, cache=True)

    train, held_out = patches([1, 2, 3]), patches([100])
    assert len(held_out.positive) > 10 and len(held_out.negative) > 10
    config = TrainConfig(model="resnet50_gicn_gpp", model_kwargs={"width": 0.125}, iterations=150, batch_size=16,
                         schedule="constant", lr=0.05, log_every=0, seed=0)
    trainer = Trainer(config, train, log=lambda s: None)
    before = evaluate_dice(trainer.model, held_out)["dice"]
    trainer.fit()
    after = evaluate_dice(trainer.model, held_out)["dice"]
    assert after >= 0.8, f"held-out Dice {after:.3f} (before training {before:.3f})"


def test_slide_file_patches_match_the_synthetic_truth(tmp_path):
    """Patches from a written slide + mask (via OpenSlide and the tissue prefilter) against the renderer."""
    from fastgicn.synth import SyntheticSlide, write_synthetic_slide
    from fastgicn.train import SlideSource, SyntheticSource

    slide_path, mask_path = write_synthetic_slide(tmp_path / "s.tif", 2048, 1536, seed=4)
    from_file = PatchDataset([SlideSource(slide_path)], size=128, downsample=1)
    from_render = PatchDataset([SyntheticSource(SyntheticSlide(2048, 1536, seed=4))], size=128, downsample=1)
    file_pos = {(p.l0_x, p.l0_y): p.tumour_fraction for p in from_file.patches}
    render_pos = {(p.l0_x, p.l0_y): p.tumour_fraction for p in from_render.patches}
    assert set(file_pos) <= set(render_pos)
    assert len(file_pos) >= 0.95 * len(render_pos)       # the prefilter only drops dust-sized tissue
    assert all(file_pos[k] == render_pos[k] for k in file_pos)
    assert len(from_file.positive) > 0
    rgb, mask = from_file[int(from_file.positive[0])]
    assert rgb.shape == (128, 128, 3) and mask.any()


def test_patches_from_a_pyramid_without_the_training_level(tmp_path):
    """A 40x-only pyramid (levels 1/4/16) trains at downsample 2: patches are level 0 box-reduced, masks too."""
    from fastgicn.slide import open_slide
    from fastgicn.synth import write_synthetic_slide
    from fastgicn.train import SlideSource

    slide_path, mask_path = write_synthetic_slide(tmp_path / "s.svs", 2048, 1536, seed=4, layout="aperio",
                                                  min_level_size=256)
    with open_slide(slide_path) as slide:
        assert not any(abs(d - 2) < 0.1 for d in slide.level_downsamples)   # no 2x level to read
    data = PatchDataset([SlideSource(slide_path)], size=64, downsample=2)
    assert len(data.positive) > 0 and len(data.negative) > 0
    with open_slide(slide_path) as slide, open_slide(mask_path) as mask:
        for i in (int(data.positive[0]), int(data.negative[0])):
            p = data.patches[i]
            rgb, label = data[i]
            level0 = slide.read_region(p.l0_x, p.l0_y, 0, 128, 128).astype(np.float64)
            ref = np.floor(level0.reshape(64, 2, 64, 2, 3).mean(axis=(1, 3)) + 0.5)
            np.testing.assert_array_equal(rgb, ref.astype(np.uint8))
            truth = mask.read_region(p.l0_x, p.l0_y, 0, 128, 128)[..., 0].reshape(64, 2, 64, 2) >= 128
            np.testing.assert_array_equal(label, truth.sum(axis=(1, 3)) >= 2)
