"""Inputs a user cannot be trusted to get right, or that come from someone else: checkpoints that would run
code, device strings torch rejects, a precision the backend would ignore, a TIFF compression nothing here decodes.
Every one ends in one line naming the file or value and the fix (exit status 2 from the CLI), never a traceback."""
import dataclasses
import pickle
import struct

import numpy as np
import pytest
import tifffile
import torch

from fastgicn.cli import main
from fastgicn.config import TileConfig
from fastgicn.engine.base import resolve_device
from fastgicn.errors import BackendUnavailable, ConfigError, SlideError
from fastgicn.models import create_model
from fastgicn.demo import DEMO_WEIGHTS
from fastgicn.slide import open_slide
from fastgicn.synth import write_synthetic_slide
from fastgicn.train import TrainConfig, load_checkpoint, model_from_checkpoint, save_checkpoint
from tiny_models import register

pytestmark = pytest.mark.usefixtures("one_torch_thread")


UNTRUSTED_TEST_CONV = register("untrusted_test_conv")  # tests/tiny_models.py: one convolution, runs in a second


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ck") / "conv.pt"
    save_checkpoint(path, create_model("untrusted_test_conv"),
                    tile_config=TileConfig(tile_size=128, overlap=32, target_mpp=0.5, batch_size=4))
    return path


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    s, _ = write_synthetic_slide(tmp_path_factory.mktemp("slide") / "small.svs", 1024, 768, seed=3, min_level_size=256)
    return s


def one_error_line(capsys, *needles):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) >= 1 and "Traceback" not in "\n".join(err)
    line = err[-1]
    assert "error:" in line
    for n in needles:
        assert str(n) in line, (n, line)
    return line


# ---------------------------------------------------------------------------------------------------
# 1. a checkpoint is data

class _PlantedCommand:
    """Unpickling this creates `marker`: any code path that runs the pickle's code leaves the file behind."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_checkpoint_that_would_run_code_is_refused_by_segment_and_nothing_runs(tmp_path, checkpoint, slide,
                                                                              capsys):
    marker = tmp_path / "the_planted_command_ran"
    payload = torch.load(checkpoint, weights_only=True)
    payload["notes"] = _PlantedCommand(marker)  # otherwise a valid checkpoint: it would segment fine
    evil = tmp_path / "shared by another lab.pt"
    torch.save(payload, evil)
    # the plant is real: an unrestricted unpickler runs it
    torch.load(evil, weights_only=False)
    assert marker.exists()
    marker.unlink()

    out = tmp_path / "out"
    code = main(["segment", str(slide), "-o", str(out), "--weights", str(evil), "--no-progress"])
    assert code == 2
    assert not marker.exists()
    line = one_error_line(capsys, evil, "refused", "io.open", "fastgicn train")
    assert "\n" not in line
    assert not list(out.glob("*.report.json"))


def test_corrupt_and_foreign_checkpoints_are_one_line(tmp_path):
    legacy = tmp_path / "legacy.pt"
    legacy.write_bytes(pickle.dumps({"format": "fastgicn-checkpoint-1", "x": [1, 2]}, protocol=2)[:-3])
    truncated = tmp_path / "truncated.pt"
    save_checkpoint(truncated, create_model("untrusted_test_conv"), tile_config=TileConfig(tile_size=64))
    truncated.write_bytes(truncated.read_bytes()[:200])
    for path in (legacy, truncated):
        with pytest.raises(ConfigError) as info:
            load_checkpoint(path)
        assert str(path) in str(info.value) and "\n" not in str(info.value)
        assert "re-download or re-train" in str(info.value)


def test_what_save_checkpoint_writes_is_plain_data_and_resumes(tmp_path):
    """Optimizer state, TileConfig, TrainConfig and NumPy numbers in the metrics all load with weights_only."""
    torch.manual_seed(0)
    model = create_model("untrusted_test_conv")
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    model(torch.rand(2, 3, 16, 16)).sum().backward()
    opt.step()
    train_config = dataclasses.asdict(TrainConfig(model="untrusted_test_conv", iterations=5))
    path = save_checkpoint(tmp_path / "run" / "last.pt", model, tile_config=TileConfig(tile_size=64),
                           optimizer=opt, iteration=np.int64(7), train_config=train_config,
                           metrics=[{"iteration": np.int64(5), "dice": np.float32(0.25)}], notes="x")
    raw = torch.load(path, map_location="cpu", weights_only=True)  # torch's own data-only loader
    assert raw["iteration"] == 7 and type(raw["iteration"]) is int
    assert raw["metrics"] == [{"iteration": 5, "dice": 0.25}] and type(raw["metrics"][0]["dice"]) is float
    assert TileConfig.from_dict(raw["tile_config"]) == TileConfig(tile_size=64)
    model2 = create_model("untrusted_test_conv")
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    model2.load_state_dict(raw["state_dict"])
    opt2.load_state_dict(raw["optimizer"])
    for p in model.parameters():
        assert torch.equal(opt.state[p]["momentum_buffer"],
                           opt2.state[dict(zip(model.parameters(), model2.parameters()))[p]]["momentum_buffer"])
    with pytest.raises(ConfigError, match=r"checkpoint\['notes'\] is of type object"):
        save_checkpoint(tmp_path / "bad.pt", model, tile_config=TileConfig(tile_size=64), notes=object())
    assert not (tmp_path / "bad.pt").exists()


def test_the_shipped_demo_weights_are_plain_data():
    raw = torch.load(DEMO_WEIGHTS, map_location="cpu", weights_only=True)
    assert model_from_checkpoint(raw).model_name == raw["model_name"]


# ---------------------------------------------------------------------------------------------------
# 2. device strings, checked before any work

BAD_DEVICES = ["gpu", "mps", "nonsense", "cuda:x", "cuda:-1"]
if not torch.cuda.is_available():
    BAD_DEVICES += ["cuda", "cuda:0"]
if torch.cuda.device_count() < 8:
    BAD_DEVICES += ["cuda:7"]


@pytest.mark.parametrize("device", BAD_DEVICES)
def test_resolve_device_refuses_with_one_line_naming_the_value(device):
    with pytest.raises((ConfigError, BackendUnavailable)) as info:
        resolve_device(device)
    msg = str(info.value)
    assert repr(device) in msg and "\n" not in msg and "cpu" in msg


def test_resolve_device_accepts_what_fastgicn_runs_on():
    assert resolve_device("cpu") == torch.device("cpu") == resolve_device(" CPU ")
    if torch.cuda.is_available():
        assert resolve_device("cuda").type == "cuda" and resolve_device("cuda").index is not None
        last = torch.cuda.device_count() - 1
        assert resolve_device(f"cuda:{last}") == torch.device("cuda", last)


@pytest.mark.parametrize("device", BAD_DEVICES)
@pytest.mark.parametrize("command", ["segment", "train", "bench"])
def test_every_command_refuses_a_bad_device_in_one_line(tmp_path, checkpoint, slide, capsys, command, device):
    argv = {"segment": ["segment", str(slide), "-o", str(tmp_path / "out"), "--weights", str(checkpoint),
                        "--no-progress"],
            "train": ["train", "--synthetic", "1", "--iterations", "1", "-o", str(tmp_path / "run")],
            "bench": ["bench", "--no-e2e", "--iters", "1"]}[command]
    assert main(argv + ["--device", device]) == 2
    one_error_line(capsys, repr(device))
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    assert not (tmp_path / "run").exists()


def test_segment_checks_the_device_before_reading_the_checkpoint(tmp_path, capsys):
    assert main(["segment", "-o", str(tmp_path), "--weights", str(tmp_path / "missing.pt"),
                 "--device", "gpu"]) == 2
    one_error_line(capsys, "'gpu'")


# ---------------------------------------------------------------------------------------------------
# 3. --precision with the torch backend is honoured, not ignored

def test_torch_backend_runs_in_the_precision_asked_for(tmp_path, checkpoint, slide, capsys):
    base = ["segment", str(slide), "--weights", str(checkpoint), "--no-progress", "--backend", "torch"]
    assert main(base + ["-o", str(tmp_path / "fp32")]) == 0
    assert "backend: torch (eager reference)" in capsys.readouterr().err
    assert main(base + ["-o", str(tmp_path / "bf16"), "--precision", "bf16"]) == 0
    err = capsys.readouterr().err
    assert "torch (bf16, cpu)" in err
    p32 = tifffile.imread(tmp_path / "fp32" / "small.tumour_probability.tif")
    p16 = tifffile.imread(tmp_path / "bf16" / "small.tumour_probability.tif")
    diff = np.abs(p32.astype(int) - p16.astype(int))
    assert diff.max() > 0  # bf16 really ran: an 8-bit mantissa moves some probabilities
    assert diff.max() <= 8 and diff.mean() < 1.0  # and it is the same model
    if not torch.cuda.is_available():
        assert main(base + ["-o", str(tmp_path / "fp16"), "--precision", "fp16"]) == 2
        one_error_line(capsys, "fp16", "CPU", "bf16")


# ---------------------------------------------------------------------------------------------------
# 4. an unsupported TIFF compression is not "corrupt"

def _tiff_with_compression_code(path, code, tile):
    rgb = np.random.default_rng(0).integers(0, 255, (512, 512, 3), dtype=np.uint8)
    tifffile.imwrite(path, rgb, tile=tile, compression="zlib", photometric="rgb")
    with tifffile.TiffFile(path) as tf:
        tag = tf.pages[0].tags["Compression"]
        assert tag.dtype == 3  # SHORT, stored in the IFD entry itself
        offset = tag.valueoffset
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(struct.pack("<H", code))
    return path


@pytest.mark.parametrize("tile", [(256, 256), None], ids=["tiled-openslide", "strips-tifffile"])
def test_unknown_compression_code_is_named_with_the_conversion(tmp_path, tile):
    path = _tiff_with_compression_code(tmp_path / "odd.tif", 33000, tile)
    with pytest.raises(SlideError) as info:
        open_slide(path)
    msg = str(info.value)
    assert "compression 33000 (unknown code) is not supported" in msg and "vips tiffsave" in msg
    assert "copy it again" not in msg and "corrupt" not in msg and str(path) in msg


def test_webp_tiled_tiff_names_webp(tmp_path):
    import imagecodecs

    if not imagecodecs.WEBP.available:
        pytest.skip("imagecodecs without WebP")
    path = tmp_path / "webp.tif"
    rgb = np.random.default_rng(1).integers(0, 255, (512, 512, 3), dtype=np.uint8)
    tifffile.imwrite(path, rgb, tile=(256, 256), compression="webp", photometric="rgb")
    with pytest.raises(SlideError, match=r"compression 50001 \(webp\) is not supported by OpenSlide: convert"):
        open_slide(path)


def test_segment_reports_the_compression_in_one_line(tmp_path, checkpoint, capsys):
    path = _tiff_with_compression_code(tmp_path / "odd.tif", 33000, (256, 256))
    assert main(["segment", str(path), "-o", str(tmp_path / "out"), "--weights", str(checkpoint),
                 "--no-progress"]) == 1
    out = capsys.readouterr().out
    assert "compression 33000" in out and "copy it again" not in out
