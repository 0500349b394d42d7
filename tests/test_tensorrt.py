"""TensorRT backend. The real build/run tests need `import tensorrt` and a GPU and are skipped elsewhere with that
reason; the pure-Python parts (cache key, messages, the 10.x vs 11.x build recipe, driven through a stand-in
module that records the API calls) run everywhere."""
import sys
import types

import numpy as np
import pytest
import torch

from fastgicn.engine import tensorrt_backend as trtb
from fastgicn.errors import BackendUnavailable, ConfigError, EngineBuildError

KEY_ARGS = dict(model_hash="ab" * 32, input_shape=(3, 512, 512), batch_profile=(1, 16, 32), precision="fp16",
                tensorrt_version="10.9.0.34", gpu_name="NVIDIA H100 80GB HBM3", compute_capability=(9, 0))


# -- pure Python ---------------------------------------------------------------------------------------------
def test_cache_key_covers_everything_that_invalidates_an_engine():
    key, fields = trtb.engine_cache_key(**KEY_ARGS)
    assert key == trtb.engine_cache_key(**KEY_ARGS)[0] and len(key) == 32
    assert fields["model_hash"] == KEY_ARGS["model_hash"] and fields["input_shape"] == [3, 512, 512]
    assert fields["batch_profile"] == [1, 16, 32] and fields["precision"] == "fp16"
    assert fields["tensorrt_version"] == "10.9.0.34" and fields["gpu_name"] == "NVIDIA H100 80GB HBM3"
    assert fields["compute_capability"] == [9, 0] and fields["strongly_typed"] is False
    changes = dict(model_hash="cd" * 32, input_shape=(3, 256, 256), batch_profile=(1, 8, 32), precision="bf16",
                   tensorrt_version="11.0.1", gpu_name="NVIDIA H200", compute_capability=(8, 0))
    for field, value in changes.items():
        other = trtb.engine_cache_key(**{**KEY_ARGS, field: value})[0]
        assert other != key, f"changing {field} must change the key"


def test_cache_paths_name_shape_precision_version_and_are_safe(tmp_path):
    key, fields = trtb.engine_cache_key(**KEY_ARGS)
    path = trtb.engine_cache_path(tmp_path, key, fields)
    assert path.parent == tmp_path / "tensorrt" and path.suffix == ".engine"
    assert "512x512-fp16-trt10.9.0.34" in path.name and key in path.name
    timing = trtb.timing_cache_path(tmp_path, "10.9.0.34", "NVIDIA H100 80GB HBM3")
    assert " " not in timing.name and "H100" in timing.name


def test_cache_key_rejects_bad_profiles():
    with pytest.raises(ConfigError, match="min <= opt <= max"):
        trtb.engine_cache_key(**{**KEY_ARGS, "batch_profile": (4, 2, 8)})
    with pytest.raises(ConfigError, match="three entries"):
        trtb.engine_cache_key(**{**KEY_ARGS, "input_shape": (512, 512)})


def test_strong_typing_follows_the_major_version():
    assert not trtb.uses_strong_typing("10.13.3.9")
    assert trtb.uses_strong_typing("11.0.1") and trtb.uses_strong_typing("11.4.0")


def test_without_tensorrt_the_error_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(BackendUnavailable, match=r"pip install 'fastgicn\[tensorrt\]'"):
        trtb.require_tensorrt()
    from fastgicn.engine import Engine
    from fastgicn.models import create_model

    with pytest.raises(BackendUnavailable, match="TensorRT Python package"):
        Engine(create_model("resnet50_gicn_gpp", width=0.0625), backend="tensorrt", device="cpu", tile_size=64)


# -- the build recipe, through a stand-in that records calls ------------------------------------------------
def fake_tensorrt(version: str, parse_ok: bool = True, plan: bytes | None = b"PLAN"):
    calls = {"flags": [], "profile": None, "network_flags": None, "timing_in": None, "pool": None}
    strong = int(version.split(".")[0]) >= 11
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version

    class Logger:
        WARNING = 2

        def __init__(self, severity):
            pass

    class NetworkDefinitionCreationFlag:
        STRONGLY_TYPED = 0

    class BuilderFlag:  # 11.x removed the precision flags: touching them there must fail
        pass

    if not strong:
        BuilderFlag.FP16, BuilderFlag.BF16 = "FP16", "BF16"

    class MemoryPoolType:
        WORKSPACE = "WORKSPACE"

    class Cache:
        def __init__(self, blob):
            self.blob = blob

        def serialize(self):
            return memoryview(self.blob + b"+new")

    class Profile:
        def set_shape(self, name, lo, opt, hi):
            calls["profile"] = (name, lo, opt, hi)

    class Config:
        def set_memory_pool_limit(self, pool, size):
            calls["pool"] = (pool, size)

        def set_flag(self, flag):
            calls["flags"].append(flag)

        def add_optimization_profile(self, profile):
            calls["profile_added"] = True

        def create_timing_cache(self, blob):
            calls["timing_in"] = bytes(blob)
            self.cache = Cache(bytes(blob))
            return self.cache

        def set_timing_cache(self, cache, ignore_mismatch):
            calls["timing_set"] = (cache, ignore_mismatch)

        def get_timing_cache(self):
            return self.cache

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            calls["network_flags"] = flags
            return object()

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            return None if plan is None else memoryview(plan)

    class OnnxParser:
        def __init__(self, network, logger):
            self.num_errors = 0 if parse_ok else 1

        def parse(self, data):
            calls["parsed"] = data
            return parse_ok

        def get_error(self, i):
            return "In node 3 (Conv): unsupported bfloat16 input"

    for cls in (Logger, NetworkDefinitionCreationFlag, BuilderFlag, MemoryPoolType, Builder, OnnxParser):
        setattr(trt, cls.__name__, cls)
    return trt, calls


def build(trt, tmp_path, precision="fp16"):
    return trtb.build_engine(b"ONNX", precision=precision, input_name="input", input_shape=(3, 64, 64),
                             batch_profile=(1, 4, 8), timing_cache=tmp_path / "t.cache", workspace_gib=1, trt=trt)


@pytest.mark.parametrize("precision,flag", [("fp16", "FP16"), ("bf16", "BF16"), ("fp32", None)])
def test_tensorrt_10_uses_builder_precision_flags(tmp_path, precision, flag):
    trt, calls = fake_tensorrt("10.9.0.34")
    assert build(trt, tmp_path, precision) == b"PLAN"
    assert calls["network_flags"] == 0 and calls["parsed"] == b"ONNX"
    assert calls["flags"] == ([flag] if flag else [])
    assert calls["profile"] == ("input", (1, 3, 64, 64), (4, 3, 64, 64), (8, 3, 64, 64))
    assert calls["pool"] == ("WORKSPACE", 1 << 30)


def test_tensorrt_11_builds_strongly_typed_networks_without_precision_flags(tmp_path):
    trt, calls = fake_tensorrt("11.0.1")
    assert build(trt, tmp_path, "fp16") == b"PLAN"
    assert calls["network_flags"] == 1 << trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED
    assert calls["flags"] == []


def test_timing_cache_is_loaded_before_and_saved_after_a_build(tmp_path):
    trt, calls = fake_tensorrt("10.9.0.34")
    build(trt, tmp_path)
    assert calls["timing_in"] == b"" and (tmp_path / "t.cache").read_bytes() == b"+new"
    build(trt, tmp_path)
    assert calls["timing_in"] == b"+new" and calls["timing_set"][1] is False


def test_parser_and_builder_failures_raise_engine_build_errors(tmp_path):
    trt, _ = fake_tensorrt("11.0.1", parse_ok=False)
    with pytest.raises(EngineBuildError, match="could not parse.*unsupported bfloat16.*precision='fp16'"):
        build(trt, tmp_path, "bf16")
    trt, _ = fake_tensorrt("10.9.0.34", plan=None)
    with pytest.raises(EngineBuildError, match="failed to build"):
        build(trt, tmp_path)


def test_engine_build_needs_a_gpu_even_with_tensorrt_importable(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU; the real tests below cover it")
    trt, _ = fake_tensorrt("10.9.0.34")
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    from fastgicn.models import create_model

    with pytest.raises(BackendUnavailable, match="CUDA GPU"):
        trtb.TensorRTBackend(create_model("resnet50_gicn_gpp", width=0.0625), device="cpu")


# -- the real thing, where TensorRT and a GPU exist -------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    from fastgicn.models import create_model

    torch.manual_seed(3)
    return create_model("resnet50_gicn_gpp", width=0.0625).eval()


@pytest.mark.cuda
@pytest.mark.tensorrt
@pytest.mark.skipif(not torch.cuda.is_available(), reason="TensorRT needs a CUDA GPU (none visible to torch)")
@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_tensorrt_engine_matches_torch_reference_and_is_cached(tiny, tmp_path, precision):
    pytest.importorskip("tensorrt", reason="TensorRT is not installed here (pip install 'fastgicn[tensorrt]')")
    from fastgicn.engine import TOLERANCE, Engine
    from fastgicn.engine.base import relative_error
    from fastgicn.models.preprocess import to_model_input

    engine = Engine(tiny, backend="tensorrt", precision=precision, device="cuda", batch_size=4, tile_size=64,
                    cache_dir=tmp_path, max_batch_size=8)
    info = engine.backend.build_info[(64, 64)]
    assert not info["cached"] and (tmp_path / "tensorrt").is_dir()
    assert any(p.name.startswith("timing-") for p in (tmp_path / "tensorrt").iterdir())
    for n in (1, 3, 8):  # inside the dynamic batch profile 1..8
        x = np.random.default_rng(n).integers(0, 256, (n, 64, 64, 3), dtype=np.uint8)
        with torch.inference_mode():
            ref = tiny(to_model_input(torch.from_numpy(x), tiny.mean, tiny.std))
        out = engine.predict(torch.from_numpy(x).cuda())
        assert out.device.type == "cuda"
        assert relative_error(out, ref) <= TOLERANCE[precision]
    again = Engine(tiny, backend="tensorrt", precision=precision, device="cuda", batch_size=4, tile_size=64,
                   cache_dir=tmp_path, max_batch_size=8)
    assert again.backend.build_info[(64, 64)]["cached"], "the second engine must come from the disk cache"


@pytest.mark.cuda
@pytest.mark.tensorrt
@pytest.mark.skipif(not torch.cuda.is_available(), reason="TensorRT needs a CUDA GPU (none visible to torch)")
def test_cli_exports_a_tensorrt_plan(tiny, tmp_path):
    pytest.importorskip("tensorrt", reason="TensorRT is not installed here (pip install 'fastgicn[tensorrt]')")
    from fastgicn.cli import main
    from fastgicn.config import TileConfig
    from fastgicn.train import save_checkpoint

    ckpt = save_checkpoint(tmp_path / "m.pt", tiny, tile_config=TileConfig(tile_size=64, batch_size=2))
    out = tmp_path / "m.engine"
    assert main(["export", str(ckpt), "--format", "tensorrt", "-o", str(out)]) == 0
    assert out.stat().st_size > 0
