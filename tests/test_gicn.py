"""Triton GICN (kernels/gicn.py) against the reference module (fastgicn/models/gicn.py), and the model swaps.

Without a GPU these run under TRITON_INTERPRET=1 (tests/conftest.py) at small shapes; the paper's full shapes
and bfloat16 carry the `cuda` marker. The reference runs in float32 on the very same (rounded) inputs and
weights, so each tolerance measures only the kernel's own rounding.
"""
from __future__ import annotations

import pytest
import torch

from fastgicn.errors import ConfigError
from fastgicn.kernels import INTERPRETED, GicnConfig, TritonGICN, gicn_forward, use_reference, use_triton
from fastgicn.models import create_model
from fastgicn.models.gicn import GICN
from kernel_checks import assert_matches, reference  # tests/kernel_checks.py

HAS_CUDA = torch.cuda.is_available()
DEV = "cuda" if HAS_CUDA else "cpu"
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
pytestmark = pytest.mark.usefixtures("no_tf32")


def make_gicn(c_in, c_out, k, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    m = GICN(c_in, c_out, k)
    with torch.no_grad():
        for p in m.parameters():   # bigger biases than the default init, so a dropped bias would show
            p.add_(torch.randn_like(p) * 0.1)
    return m.to(DEV, dtype).eval()


def make_input(n, c, h, w, dtype=torch.float32, channels_last=False, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g).to(DEV, dtype)
    return x.to(memory_format=torch.channels_last) if channels_last else x


CASES = [
    # n, c_in, h, w, k, c_out, dtype, channels_last
    pytest.param(2, 5, 13, 21, 7, 32, torch.float32, False, id="13x21-k7-fp32-nchw-batch2"),
    pytest.param(1, 5, 13, 21, 7, 32, torch.float32, True, id="13x21-k7-fp32-cl"),
    pytest.param(1, 3, 8, 8, 1, 32, torch.float32, False, id="k1"),
    pytest.param(1, 6, 9, 7, 3, 32, torch.float32, True, id="k3-9x7"),
    pytest.param(2, 5, 11, 10, 9, 20, torch.float32, False, id="k9-cout20"),
    pytest.param(1, 3, 9, 12, 15, 8, torch.float32, False, id="k15-larger-than-map"),
    pytest.param(2, 20, 13, 21, 7, 32, torch.float16, True, id="13x21-k7-fp16-cl"),
    pytest.param(1, 7, 17, 5, 3, 4, torch.float16, False, id="k3-fp16-nchw-cout4"),
]


@pytest.mark.parametrize("n,c_in,h,w,k,c_out,dtype,channels_last", CASES)
def test_gicn_matches_reference(n, c_in, h, w, k, c_out, dtype, channels_last):
    m = make_gicn(c_in, c_out, k, dtype)
    x = make_input(n, c_in, h, w, dtype, channels_last)
    with torch.inference_mode():
        y = gicn_forward(x, m)
    assert_matches(y, reference(m, x), dtype)
    # the output keeps the input's memory format, as the reference convolutions do
    assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def test_gicn_split_k_and_strided_input():
    """C_in split over programs with atomic adds, and an input that is a strided view (neither layout)."""
    m = make_gicn(40, 32, 5)
    base = make_input(2, 80, 12, 26)
    x = base[:, ::2, :, 1::2]   # channel stride 2, width stride 2: read in place
    with torch.inference_mode():
        y = gicn_forward(x, m, GicnConfig(block_h=4, block_w=8, block_k=16, split_k=3))
    assert_matches(y, reference(m, x), torch.float32)


def test_gicn_weight_update_invalidates_packed_cache():
    m = make_gicn(4, 8, 3)
    x = make_input(1, 4, 8, 9)
    with torch.inference_mode():
        gicn_forward(x, m)
        with torch.no_grad():
            m.b_row.weight.mul_(-2.0)
            m.a_row.bias.add_(1.0)
        y = gicn_forward(x, m)
    assert_matches(y, reference(m, x), torch.float32)


def test_triton_module_shares_parameters_and_keys():
    ref = make_gicn(6, 8, 7)
    tri = TritonGICN(ref)
    assert list(tri.state_dict()) == list(ref.state_dict())
    assert all(a is b for a, b in zip(tri.parameters(), ref.parameters()))
    x = make_input(1, 6, 10, 11)
    with torch.inference_mode():
        assert_matches(tri(x), reference(ref, x), torch.float32)
    assert tri.to_reference() is ref


def test_use_triton_whole_small_model():
    """width=0.125 ResNet50-GICN-GPP at 64 x 64: every GICN and the GPP swapped, logits match the reference."""
    torch.manual_seed(0)
    model = create_model("resnet50_gicn_gpp", k=7, width=0.125).to(DEV).eval()
    keys = list(model.state_dict())
    x = make_input(2, 3, 64, 64)
    with torch.inference_mode():
        ref = model(x)
        assert use_triton(model) is model
        assert [type(getattr(model.decoder, f"gicn{i}")) for i in range(1, 5)] == [TritonGICN] * 4
        assert type(model.gpp_branch.gpp).__name__ == "TritonGPP"
        assert list(model.state_dict()) == keys
        y = model(x)
    torch.testing.assert_close(y, ref, atol=1e-4 * ref.abs().max().item(), rtol=1e-4)
    use_reference(model)
    assert type(model.decoder.gicn1) is GICN and type(model.gpp_branch.gpp).__name__ == "GPP"
    with torch.inference_mode():
        torch.testing.assert_close(model(x), ref, atol=0, rtol=0)


def test_use_triton_on_a_bare_module():
    ref = make_gicn(3, 4, 3)
    tri = use_triton(ref)
    assert isinstance(tri, TritonGICN) and use_reference(tri) is ref


# --- what the launcher refuses ------------------------------------------------------------------------------

def test_even_or_out_of_range_k_is_refused():
    m = make_gicn(3, 4, 7)
    x = make_input(1, 3, 8, 8)
    with torch.inference_mode():
        for k in (8, 17, 0):
            m.k = k
            with pytest.raises(ConfigError, match="odd k"):
                gicn_forward(x, m)


def test_unsupported_module_layout_is_refused():
    m = make_gicn(3, 4, 3)
    m.a_row.dilation = (1, 2)
    with torch.inference_mode(), pytest.raises(ConfigError, match="dilation"):
        gicn_forward(make_input(1, 3, 8, 8), m)
    big = make_gicn(3, 160, 1)
    with torch.inference_mode(), pytest.raises(ConfigError, match="C_out=160"):
        gicn_forward(make_input(1, 3, 8, 8), big)


def test_autograd_is_refused():
    m = make_gicn(3, 4, 3)
    x = make_input(1, 3, 8, 8)
    with pytest.raises(ConfigError, match="forward-only"):
        gicn_forward(x, m)          # parameters require grad and grad mode is on
    with torch.no_grad():
        gicn_forward(x, m)          # fine under no_grad


@pytest.mark.parametrize("bad", ["int", "channels", "mixed-dtype", "3d"])
def test_bad_inputs_are_refused(bad):
    m = make_gicn(3, 4, 3)
    x = make_input(1, 3, 8, 8)
    x = {"int": x.to(torch.int32), "channels": make_input(1, 5, 8, 8), "mixed-dtype": x.half(), "3d": x[0]}[bad]
    with torch.inference_mode(), pytest.raises(ConfigError):
        gicn_forward(x, m)


@pytest.mark.skipif(not INTERPRETED, reason="only the interpreter lacks bfloat16")
def test_bfloat16_is_refused_by_the_interpreter():
    m = make_gicn(3, 4, 3, torch.bfloat16)
    with torch.inference_mode(), pytest.raises(ConfigError, match="bfloat16"):
        gicn_forward(make_input(1, 3, 8, 8, torch.bfloat16), m)


@pytest.mark.skipif(INTERPRETED, reason="under the interpreter CPU tensors are supported")
def test_cpu_tensor_is_refused_when_compiled_for_cuda():
    m = make_gicn(3, 4, 3).cpu()
    with torch.inference_mode(), pytest.raises(ConfigError, match="TRITON_INTERPRET"):
        gicn_forward(torch.randn(1, 3, 8, 8), m)


# --- GPU: the paper's shapes and bfloat16 ---------------------------------------------------------------------

PAPER = [(256, 128), (512, 64), (1024, 64), (2048, 64)]   # Res-2..5 channels and side at a 512 x 512 input


@pytest.mark.parametrize("c_in,side", PAPER, ids=["res2", "res3", "res4", "res5"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("channels_last", [True, False], ids=["cl", "nchw"])
@pytest.mark.cuda
@needs_cuda
def test_gicn_paper_shapes(c_in, side, dtype, channels_last):
    m = make_gicn(c_in, 32, 7, dtype)
    x = make_input(2, c_in, side, side, dtype, channels_last)
    with torch.inference_mode():
        y = gicn_forward(x, m)
    assert_matches(y, reference(m, x), dtype)


@pytest.mark.parametrize("k", [1, 3, 9, 13, 15])
@pytest.mark.cuda
@needs_cuda
def test_gicn_k_sweep_batch1_res5_split_k(k):
    """Batch 1 at Res-5 is where the launcher splits C_in across programs."""
    m = make_gicn(2048, 32, k, torch.float16)
    x = make_input(1, 2048, 64, 64, torch.float16, channels_last=True)
    with torch.inference_mode():
        y = gicn_forward(x, m)
    assert_matches(y, reference(m, x), torch.float16)


def test_packed_weights_of_a_module_built_in_inference_mode():
    """Inference tensors keep no version counter: the packed-weight cache must still work with them."""
    with torch.inference_mode():
        m = make_gicn(4, 8, 3)
        x = make_input(1, 4, 8, 9)
        y = gicn_forward(x, m)
        torch.testing.assert_close(gicn_forward(x, m), y, atol=0, rtol=0)
    assert_matches(y, reference(m, x), torch.float32)


# --- bench/bench_gicn.py: it needs a GPU to time anything, but every code path runs here ----------------------

def _load_bench(name):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_gicn_dry_run_smoke_and_no_gpu_message(tmp_path, capsys):
    import json

    bench = _load_bench("bench_gicn")
    assert bench.main(["--dry-run", "--stage", "res4", "res5", "--batch", "1", "32"]) == 0
    planned = json.loads(capsys.readouterr().out)
    assert {(c["stage"], c["c_in"], c["side"]) for c in planned["cases"]} == {("res4", 1024, 64),
                                                                            ("res5", 2048, 64)}
    assert len(planned["cases"]) == 2 * 2 * 2 * 2 and "torch" in planned["environment"]
    if not HAS_CUDA:
        assert bench.main(["--batch", "1"]) == 2
        assert "no CUDA GPU" in capsys.readouterr().err
    out = tmp_path / "gicn.json"
    assert bench.main(["--smoke", "--stage", "res5", "--batch", "1", "--dtype", "float32", "--layout", "nchw",
                       "--sweep", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    row = result["results"][0]
    assert result["smoke"] and row["max_rel_err"] < 1e-4 and row["triton_ms"] > 0 and "best_config" in row


def test_kernels_compile_for_sm90_without_spills():
    """The interpreter cannot tell whether a kernel compiles for a GPU, nor whether it spills: compile each
    kernel (GICN stages 1-2, GPP pool / conv / upsample) for sm_90 with the launchers' block sizes, here, on CPU,
    with Triton's bundled ptxas, in a process without TRITON_INTERPRET."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-W", "ignore", "-m", "fastgicn.kernels.compile_report", "--quick"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = [line for line in r.stdout.splitlines() if line.startswith(("gicn", "gpp"))]
    assert len(rows) == 5 and all(line.rstrip().endswith("PASS") for line in rows), r.stdout


def test_tracing_a_triton_model_says_to_swap_back():
    tri = TritonGICN(make_gicn(3, 4, 3))
    x = make_input(1, 3, 8, 8)
    with torch.no_grad(), pytest.raises(ConfigError, match="use_reference"):
        torch.jit.trace(tri, x)
    ref = use_reference(tri)
    with torch.no_grad():
        traced = torch.jit.trace(ref, x)
        torch.testing.assert_close(traced(x), ref(x))
