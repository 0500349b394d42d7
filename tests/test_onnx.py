"""ONNX export (standard ops only, metadata, dynamic batch), the torch-free runtime, the CLI, and the 16-bit graph
TensorRT 11 consumes, checked with ONNX Runtime against the torch reference."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx", reason="the ONNX tests need onnx (pip install 'fastgicn[onnx]')")
ort = pytest.importorskip("onnxruntime", reason="the ONNX tests need onnxruntime (pip install 'fastgicn[onnx]')")

from fastgicn.config import TileConfig  # noqa: E402
from fastgicn.engine import TOLERANCE  # noqa: E402
from fastgicn.engine.base import model_fingerprint, relative_error  # noqa: E402
from fastgicn.engine.export import check_onnx_graph, export_onnx, onnx_metadata  # noqa: E402
from fastgicn.engine.onnxruntime_backend import OnnxSegmenter  # noqa: E402
from fastgicn.errors import ConfigError, EngineBuildError  # noqa: E402
from fastgicn.models import create_model  # noqa: E402
from fastgicn.models.preprocess import to_model_input  # noqa: E402

STANDARD_OPS = {"Add", "AveragePool", "BatchNormalization", "Cast", "Concat", "Constant", "Conv", "ConvTranspose",
                "Gather", "Identity", "Relu", "Resize", "Shape", "Slice", "Unsqueeze", "Mul", "Div", "Sub",
                "Reshape", "ConstantOfShape", "Equal", "Where", "Expand"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(1)
    return create_model("resnet50_gicn_gpp", width=0.0625).eval()


def reference_logits(model, x_uint8):
    with torch.inference_mode():
        return model(to_model_input(torch.from_numpy(x_uint8), model.mean, model.std)).numpy()


def pixels(n, h, w, seed):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("name,size", [("resnet50_gicn_gpp", (64, 64)), ("resnet50_gpp", (48, 72))])
def test_graph_has_standard_ops_only_and_matches_torch(name, size):
    torch.manual_seed(2)
    m = create_model(name, width=0.0625).eval()
    data = export_onnx(m, size=size)
    proto = onnx.load_from_string(data)
    ops = check_onnx_graph(proto)
    assert set(ops) <= STANDARD_OPS, f"unexpected ops {set(ops) - STANDARD_OPS}"
    assert not any("adaptive" in n.op_type.lower() or n.op_type.startswith("Global") for n in proto.graph.node)
    if m.gpp_branch is not None:
        assert ops["AveragePool"] == 4  # the four fixed-kernel pyramid pools
    dim0 = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert dim0.dim_param == "batch", "the batch dimension must be dynamic"
    seg = OnnxSegmenter(data)
    assert seg.size == size
    for n in (1, 3):
        x = pixels(n, *size, n)
        err = relative_error(torch.from_numpy(seg.run(x)), torch.from_numpy(reference_logits(m, x)))
        assert err <= TOLERANCE["fp32"]


def test_metadata_carries_what_a_torch_free_runtime_needs(model):
    meta = onnx_metadata(onnx.load_from_string(export_onnx(model, size=64)))
    assert meta["model_name"] == "resnet50_gicn_gpp" and json.loads(meta["model_kwargs"]) == {"width": 0.0625}
    assert json.loads(meta["mean"]) == pytest.approx(model.mean) and meta["input_size"] == "64,64"
    assert meta["model_hash"] == model_fingerprint(model) and meta["precision"] == "fp32"


def test_fp16_graph_for_strongly_typed_tensorrt_runs_in_onnxruntime(model):
    proto = onnx.load_from_string(export_onnx(model, size=64, precision="fp16"))
    init_types = {i.data_type for i in proto.graph.initializer if len(i.dims) == 4}  # conv weights
    assert init_types == {onnx.TensorProto.FLOAT16}, "weights must be fp16 inside the graph"
    io_types = {v.type.tensor_type.elem_type for v in list(proto.graph.input) + list(proto.graph.output)}
    assert io_types == {onnx.TensorProto.FLOAT}, "I/O stays float32 (casts inside the graph)"
    x = pixels(2, 64, 64, 5)
    out = OnnxSegmenter(proto.SerializeToString()).run(x)
    assert relative_error(torch.from_numpy(out), torch.from_numpy(reference_logits(model, x))) <= TOLERANCE["fp16"]


def test_graph_check_rejects_adaptive_pooling_and_foreign_ops():
    from onnx import helper

    def graph_with(op, domain=""):
        node = helper.make_node(op, ["x"], ["y"], domain=domain, name="n0")
        g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4, 8, 8])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)])
        return helper.make_model(g)

    with pytest.raises(EngineBuildError, match="GlobalAveragePool"):
        check_onnx_graph(graph_with("GlobalAveragePool"))  # what adaptive_avg_pool2d(1) exports to
    with pytest.raises(EngineBuildError, match="ATen"):
        check_onnx_graph(graph_with("ATen", "org.pytorch.aten"))
    assert check_onnx_graph(graph_with("Relu")) == {"Relu": 1}


def test_segmenter_outputs_and_errors(model, tmp_path):
    path = tmp_path / "m.onnx"
    export_onnx(model, path, size=64)
    seg = OnnxSegmenter(path)
    x = pixels(2, 64, 64, 6)
    logits = seg.predict(x)
    np.testing.assert_array_equal(seg.predict(x, output="labels"), logits.argmax(1))
    np.testing.assert_allclose(seg.predict(x, output="probabilities").sum(1), 1.0, atol=1e-5)
    as_float = x.transpose(0, 3, 1, 2).astype(np.float32) / 255
    np.testing.assert_allclose(seg.predict(as_float), logits, atol=1e-5)
    with pytest.raises(ConfigError, match="exported for 64 x 64"):
        seg.run(pixels(1, 72, 72, 0))
    with pytest.raises(ConfigError, match="does not exist"):
        OnnxSegmenter(tmp_path / "missing.onnx")
    with pytest.raises(ConfigError, match="output="):
        seg.predict(x, output="mask")


def test_onnx_runtime_path_runs_without_torch(model, tmp_path):
    path = tmp_path / "m.onnx"
    export_onnx(model, path, size=64)
    x = pixels(2, 64, 64, 8)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "ref.npy", reference_logits(model, x))
    script = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = None  # any `import torch` now fails
        import numpy as np
        from fastgicn.engine.onnxruntime_backend import OnnxSegmenter
        seg = OnnxSegmenter({str(path)!r})
        out = seg.predict(np.load({str(tmp_path / 'x.npy')!r}))
        ref = np.load({str(tmp_path / 'ref.npy')!r})
        err = np.linalg.norm(out - ref) / np.linalg.norm(ref)
        assert err < 1e-4, err
        assert not any(m == "torch" or m.startswith("torch.") for m, v in sys.modules.items() if v is not None)
        print("ok", err)
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.startswith("ok")


def test_cli_export_onnx_from_a_checkpoint(model, tmp_path, capsys):
    from fastgicn.cli import main
    from fastgicn.train import save_checkpoint

    ckpt = save_checkpoint(tmp_path / "m.pt", model, tile_config=TileConfig(tile_size=64, batch_size=2))
    out = tmp_path / "out" / "m.onnx"
    assert main(["export", str(ckpt), "--format", "onnx", "-o", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    seg = OnnxSegmenter(out)
    assert seg.size == (64, 64)  # from the checkpoint's tile config
    x = pixels(1, 64, 64, 9)
    assert relative_error(torch.from_numpy(seg.run(x)), torch.from_numpy(reference_logits(model, x))) < 1e-4
    # TensorRT is not installed here (or there is no GPU): a one-line error saying what to install, status 2
    if not torch.cuda.is_available() or not _has_tensorrt():
        assert main(["export", str(ckpt), "--format", "tensorrt", "-o", str(tmp_path / "m.engine")]) == 2
        err = capsys.readouterr().err
        assert "tensorrt" in err.lower() and ("pip install" in err or "CUDA GPU" in err)


def _has_tensorrt() -> bool:
    try:
        import tensorrt  # noqa: F401
    except Exception:
        return False
    return True


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or "CUDAExecutionProvider" not in ort.get_available_providers(),
                    reason="needs a CUDA GPU and onnxruntime-gpu (CUDAExecutionProvider)")
def test_cuda_provider_with_io_binding_matches_reference(model):
    from fastgicn.engine import Engine

    engine = Engine(model, backend="onnxruntime", precision="fp16", device="cuda", batch_size=2, tile_size=64)
    x = pixels(3, 64, 64, 10)
    out = engine.predict(torch.from_numpy(x).cuda())
    assert out.device.type == "cuda"
    assert relative_error(out, torch.from_numpy(reference_logits(model, x))) <= TOLERANCE["fp16"]
