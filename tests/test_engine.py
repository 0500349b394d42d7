"""Engine and backends: each backend against the torch reference on the same input, auto selection and
fallback, input/output handling, errors, checkpoints, streaming and the slide pipeline hand-off."""
import sys
import types

import numpy as np
import pytest
import torch

from fastgicn.config import TileConfig
from fastgicn.engine import TOLERANCE, Engine
from fastgicn.engine.base import relative_error
from fastgicn.errors import BackendUnavailable, ConfigError, EngineBuildError
from fastgicn.models import create_model

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none visible to torch)")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = create_model("resnet50_gicn_gpp", width=0.0625).eval()
    with torch.no_grad():  # non-trivial BN statistics, so a wrong normalisation or fold would show
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.2, 0.2)
                mod.running_var.uniform_(0.5, 1.5)
    return m


@pytest.fixture(scope="module")
def reference(model):
    return Engine(model, backend="torch", precision="fp32", device="cpu", batch_size=2, tile_size=64)


def pixels(n, h, w, seed):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


# -- every backend against the reference ----------------------------------------------------------------
CPU_CASES = [
    # (backend, precision, options, [(tile shape, tiles)]): a second, non-square size is built on first use;
    # 3 tiles with batch_size 2 go through in two chunks
    ("onnxruntime", "fp32", {}, [((64, 64), 3), ((56, 72), 2)]),
    ("onnxruntime", "fp16", {}, [((64, 64), 2)]),
    ("torch", "bf16", {}, [((56, 72), 2)]),
    # Dynamo capture + channels-last + the backend's own code, without Inductor's 20-80 s C++ compile; one
    # shape and batch so Dynamo compiles once
    ("compiled", "fp32", {"compile_backend": "aot_eager"}, [((64, 64), 2)]),
]


@pytest.mark.parametrize("name,precision,options,cases", CPU_CASES, ids=[f"{c[0]}-{c[1]}" for c in CPU_CASES])
def test_backend_matches_torch_reference(model, reference, name, precision, options, cases):
    engine = Engine(model, backend=name, precision=precision, device="cpu", batch_size=2, tile_size=64,
                    **options)
    assert engine.backend_name == name and engine.precision == precision
    for seed, (shape, n) in enumerate(cases):
        x = pixels(n, *shape, seed)
        ref = reference.predict(x)
        out = engine.predict(x)
        assert out.shape == ref.shape == (n, 2) + shape and out.dtype == np.float32
        err = relative_error(torch.from_numpy(out), torch.from_numpy(ref))
        assert err <= TOLERANCE[precision], f"{name} {precision} {shape}: relative error {err:.2e}"
        agree = (out.argmax(1) == ref.argmax(1)).mean()
        assert agree > (0.999 if precision == "fp32" else 0.95)


@pytest.mark.skipif(not __import__("os").environ.get("FASTGICN_COMPILE_TESTS"),
                    reason="Inductor's C++ compile takes 20-80 s per shape on a shared 2-core CPU; set "
                           "FASTGICN_COMPILE_TESTS=1 to run the compiled backend with Inductor on CPU")
def test_compiled_inductor_on_cpu_matches_reference(model, reference):
    engine = Engine(model, backend="compiled", precision="fp32", device="cpu", batch_size=2, tile_size=64)
    x = pixels(2, 64, 64, 7)
    assert relative_error(torch.from_numpy(engine.predict(x)), torch.from_numpy(reference.predict(x))) \
        <= TOLERANCE["fp32"]


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("name,precision", [("torch", "fp16"), ("torch", "bf16"), ("compiled", "fp16"),
                                            ("compiled", "bf16"), ("onnxruntime", "fp16")])
def test_gpu_backend_matches_fp32_reference(model, reference, name, precision):
    try:
        engine = Engine(model, backend=name, precision=precision, device="cuda", batch_size=4, tile_size=64)
    except BackendUnavailable as exc:
        if name != "onnxruntime":  # on a GPU machine, torch and compiled must build: a failure is a failure
            raise
        pytest.skip(f"onnxruntime-gpu (CUDAExecutionProvider) is not installed: {exc}")
    for n in (1, 3, 4):  # 1 and 4 are captured CUDA graphs, 3 is padded to 4
        x = pixels(n, 64, 64, n)
        err = relative_error(torch.from_numpy(engine.predict(x)), torch.from_numpy(reference.predict(x)))
        assert err <= TOLERANCE[precision], f"{engine.backend.description}: {err:.2e}"
    if name == "compiled":
        assert "CUDA graphs" in engine.backend.description
        xd = torch.from_numpy(pixels(2, 64, 64, 9)).cuda()
        out = engine.predict(xd, output="labels")
        assert out.device.type == "cuda" and out.dtype == torch.uint8


@pytest.mark.cuda
@cuda
def test_auto_on_gpu_picks_a_verified_backend(model):
    engine = Engine(model, device="cuda", batch_size=4, tile_size=64)
    assert engine.precision == "fp16"
    assert engine.selection[-1]["status"] == "chosen"
    assert engine.backend_name in ("tensorrt", "compiled", "onnxruntime", "torch")


# -- input and output handling --------------------------------------------------------------------------
def test_outputs_and_input_forms_agree(reference):
    x = pixels(3, 64, 64, 3)  # more tiles than batch_size=2: chunked
    logits = reference.predict(x)
    labels = reference.predict(x, output="labels")
    probs = reference.predict(x, output="probabilities")
    assert labels.dtype == np.uint8 and labels.shape == (3, 64, 64)
    np.testing.assert_array_equal(labels, logits.argmax(1))
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.log(probs[:, 1] / probs[:, 0]), logits[:, 1] - logits[:, 0], atol=1e-3)
    # the same tiles one by one, as a torch tensor, and as float NCHW in 0..1
    single = np.concatenate([reference.predict(x[i:i + 1]) for i in range(3)])
    np.testing.assert_allclose(single, logits, atol=1e-5)
    t = reference.predict(torch.from_numpy(x))
    assert isinstance(t, torch.Tensor) and t.device.type == "cpu"
    np.testing.assert_allclose(t.numpy(), logits, atol=1e-6)
    as_float = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255
    np.testing.assert_allclose(reference.predict(as_float).numpy(), logits, atol=1e-5)


@pytest.mark.parametrize("batch,match", [
    (np.zeros((1, 60, 64, 3), np.uint8), "multiples of 8"),
    (np.zeros((1, 40, 40, 3), np.uint8), "at least 48"),
    (np.zeros((1, 64, 64, 4), np.uint8), "N x H x W x 3"),
    (np.zeros((64, 64, 3), np.uint8), "N x H x W x 3"),
    (np.zeros((1, 64, 64, 3), np.int32), "dtype"),
    (np.zeros((0, 64, 64, 3), np.uint8), "empty"),
    ([[1, 2]], "numpy array or a torch tensor"),
])
def test_bad_batches_raise_config_errors(reference, batch, match):
    with pytest.raises(ConfigError, match=match):
        reference.predict(batch)


def test_bad_arguments_raise_config_errors(model, reference):
    with pytest.raises(ConfigError, match="output="):
        reference.predict(pixels(1, 64, 64, 0), output="mask")
    with pytest.raises(ConfigError, match="backend="):
        Engine(model, backend="tflite", device="cpu", tile_size=64)
    with pytest.raises(ConfigError, match="precision="):
        Engine(model, backend="torch", precision="int8", device="cpu", tile_size=64)
    with pytest.raises(ConfigError, match="takes no option"):
        Engine(model, backend="torch", device="cpu", tile_size=64, cuda_graphs=False)
    with pytest.raises(ConfigError, match="no backend takes"):
        Engine(model, device="cpu", tile_size=64, warp_speed=9)
    with pytest.raises(ConfigError, match="checkpoint"):
        Engine(42)


def test_unusable_backends_say_what_to_install_or_change(model, monkeypatch):
    with pytest.raises(BackendUnavailable, match="fp16 on CPU"):
        Engine(model, backend="torch", precision="fp16", device="cpu", tile_size=64)
    with pytest.raises(BackendUnavailable, match="bf16"):
        Engine(model, backend="onnxruntime", precision="bf16", device="cpu", tile_size=64)
    with pytest.raises(BackendUnavailable, match="Triton GICN/GPP kernels need a CUDA GPU"):
        Engine(model, backend="compiled", precision="fp32", device="cpu", tile_size=64, triton=True)
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # as on a machine without TensorRT
    with pytest.raises(BackendUnavailable, match="pip install"):
        Engine(model, backend="tensorrt", device="cpu", tile_size=64)
    if not torch.cuda.is_available():
        with pytest.raises(BackendUnavailable, match="no CUDA GPU"):
            Engine(model, backend="torch", device="cuda", tile_size=64)


# -- auto: choice, reasons, fallback --------------------------------------------------------------------
def test_auto_on_cpu_picks_onnxruntime_and_says_why(model):
    engine = Engine(model, device="cpu", batch_size=2, tile_size=64)
    assert engine.backend_name == "onnxruntime" and engine.precision == "fp32" and not engine.fell_back
    text = engine.describe()
    assert "chosen onnxruntime" in text and "CPU provider" in text


def test_auto_falls_back_when_a_backend_is_missing(model, monkeypatch):
    from fastgicn.engine import onnxruntime_backend

    def missing():
        raise BackendUnavailable("the onnxruntime backend needs onnxruntime: pip install 'fastgicn[onnx]'")

    monkeypatch.setattr(onnxruntime_backend, "_require_ort", missing)
    engine = Engine(model, device="cpu", batch_size=2, tile_size=64)
    assert engine.backend_name == "torch" and engine.fell_back
    assert [s["status"] for s in engine.selection] == ["unavailable", "chosen"]
    assert "skipped onnxruntime" in engine.describe() and "pip install" in engine.describe()


def test_auto_falls_back_when_a_backend_disagrees_with_the_reference(model, monkeypatch, caplog):
    from fastgicn.engine.onnxruntime_backend import OnnxRuntimeBackend

    real = OnnxRuntimeBackend.forward
    monkeypatch.setattr(OnnxRuntimeBackend, "forward", lambda self, x: real(self, x) * 1.5)  # a wrong backend
    engine = Engine(model, device="cpu", batch_size=2, tile_size=64)
    assert engine.backend_name == "torch"
    assert engine.selection[0]["status"] == "failed" and "relative error" in engine.selection[0]["reason"]
    assert "FELL BACK from onnxruntime" in engine.describe()
    assert any("failed" in r.getMessage() for r in caplog.records)


def test_a_backend_asked_by_name_that_fails_verification_raises(model, monkeypatch):
    from fastgicn.engine.torch_backend import TorchBackend

    real = TorchBackend.forward
    monkeypatch.setattr(TorchBackend, "forward", lambda self, x: real(self, x) + 1.0)
    with pytest.raises(EngineBuildError, match="relative error"):
        Engine(model, backend="torch", device="cpu", tile_size=64, verify=True)


# -- checkpoints, streaming, slides -----------------------------------------------------------------------
def test_engine_from_checkpoint_takes_tile_config_and_normalisation(model, reference, tmp_path):
    from fastgicn.train import save_checkpoint

    path = save_checkpoint(tmp_path / "m.pt", model, tile_config=TileConfig(tile_size=64, batch_size=3))
    engine = Engine(path, backend="torch", device="cpu")
    assert engine.batch_size == 3 and engine.tile_size == 64
    x = pixels(2, 64, 64, 11)
    np.testing.assert_allclose(engine.predict(x), reference.predict(x), atol=1e-5)


def test_stream_assembles_what_predict_gives(reference):
    rng = np.random.default_rng(4)
    image = rng.integers(0, 256, (128, 192, 3), dtype=np.uint8)
    stream = reference.stream(width=192, height=128, overlap=0)
    regions = []
    for l0_x, l0_y in stream.tile_positions():
        regions += stream.push(image[l0_y:l0_y + 64, l0_x:l0_x + 64], int(l0_x), int(l0_y))
    regions += stream.close()
    labels = np.zeros((128, 192), np.uint8)
    for r in regions:
        labels[r.lvl_y:r.lvl_y + r.height, r.lvl_x:r.lvl_x + r.width] = r.labels
    tiles = np.stack([image[y:y + 64, x:x + 64] for y in (0, 64) for x in (0, 64, 128)])
    expect = reference.predict(tiles, output="labels")
    for i, (y, x) in enumerate((y, x) for y in (0, 64) for x in (0, 64, 128)):
        np.testing.assert_array_equal(labels[y:y + 64, x:x + 64], expect[i])


def test_segment_slide_hands_the_backend_to_the_pipeline(reference, monkeypatch, tmp_path):
    import fastgicn.slide as slide_pkg

    calls = {}

    def segment_slide(slide, out_dir, model, config=None, device="cpu", *, model_fp=None, progress=None):
        calls.update(model=model, config=config, device=device, model_fp=model_fp)
        x = torch.from_numpy(pixels(2, config.tile_size, config.tile_size, 0))
        return model.forward(x)  # the pipeline calls forward(uint8 batch on the device) -> logits

    fake = types.ModuleType("fastgicn.pipeline")
    fake.segment_slide = segment_slide
    monkeypatch.setitem(sys.modules, "fastgicn.pipeline", fake)
    monkeypatch.setattr(slide_pkg, "pipeline", fake, raising=False)
    logits = reference.segment_slide(tmp_path / "s.svs", tmp_path / "out", progress=False)
    assert calls["model"] is reference.backend and calls["model"].model_name == "resnet50_gicn_gpp"
    assert calls["config"].tile_size == 64 and calls["config"].batch_size == 2
    assert len(calls["model_fp"]) == 64 and logits.shape == (2, 2, 64, 64)
    with pytest.raises(ConfigError, match="batch_size"):
        reference.segment_slide("s.svs", tmp_path, config=TileConfig(tile_size=64, batch_size=16))


def test_segment_slide_runs_the_real_pipeline_on_a_synthetic_slide(reference, tmp_path):
    import fastgicn.pipeline as pipeline
    import fastgicn.synth as synth
    slide, _ = synth.write_synthetic_slide(tmp_path / "s.tif", 256, 192, seed=2)
    result = reference.segment_slide(slide, tmp_path / "out", progress=False)
    assert isinstance(result, pipeline.SlideResult) and result.status == "done"
    assert result.report["tiles"]["read"] >= 1 and "forward" in result.report["seconds"]


def test_a_model_with_triton_modules_is_served_through_its_reference_modules(model, reference):
    import fastgicn.kernels as kernels
    import copy

    swapped = kernels.use_triton(copy.deepcopy(model))
    engine = Engine(swapped, backend="torch", device="cpu", batch_size=2, tile_size=64)
    assert not any(type(m).__name__.startswith("Triton") for m in engine.backend.model.modules())
    assert any(type(m).__name__.startswith("Triton") for m in swapped.modules()), "the caller's model is untouched"
    x = pixels(2, 64, 64, 12)
    np.testing.assert_allclose(engine.predict(x), reference.predict(x), atol=1e-5)


def test_auto_survives_an_unexpected_error_in_a_backend(model, monkeypatch):
    from fastgicn.engine.onnxruntime_backend import OnnxRuntimeBackend

    def broken(self, size):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(OnnxRuntimeBackend, "prepare", broken)
    engine = Engine(model, device="cpu", batch_size=2, tile_size=64)
    assert engine.backend_name == "torch"
    assert engine.selection[0] == {"backend": "onnxruntime", "status": "failed",
                                   "reason": "RuntimeError: CUDA error: an illegal memory access was encountered"}
    with pytest.raises(RuntimeError, match="illegal memory access"):  # by name: the caller sees it as it is
        Engine(model, backend="onnxruntime", device="cpu", batch_size=2, tile_size=64)
    with pytest.raises(ConfigError, match="tile_size=60"):
        Engine(model, device="cpu", tile_size=60)
