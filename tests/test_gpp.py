"""Triton GPP (kernels/gpp.py) against the reference module (fastgicn/models/gpp.py).

Without a GPU these run under TRITON_INTERPRET=1 (tests/conftest.py) at small shapes; the paper's Res-5
(2048 x 64 x 64, 512 channels a branch) and bfloat16 carry the `cuda` marker. BatchNorm statistics are random so
that folding them is exercised; the reference runs in float32 on the same rounded inputs and weights.
"""
from __future__ import annotations

import pytest
import torch

from fastgicn.errors import ConfigError
from fastgicn.kernels import TritonGPP, gpp_forward, gpp_output_buffer, use_reference, use_triton
from fastgicn.models.gpp import GPP
from kernel_checks import assert_matches, reference  # tests/kernel_checks.py

HAS_CUDA = torch.cuda.is_available()
DEV = "cuda" if HAS_CUDA else "cpu"
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
pytestmark = pytest.mark.usefixtures("no_tf32")


def make_gpp(c_in, c_out, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    m = GPP(c_in, c_out)
    with torch.no_grad():
        for br in m.branches:
            bn = br[1]
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    return m.to(DEV, dtype).eval()


def make_input(n, c, h, w, dtype=torch.float32, channels_last=False, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g).add_(0.3).to(DEV, dtype)   # mean > 0: pooled values not ~0
    return x.to(memory_format=torch.channels_last) if channels_last else x


CASES = [
    # n, c_in, h, w, c_out, dtype, channels_last, pixel_split
    pytest.param(2, 6, 13, 21, 8, torch.float32, False, 0, id="13x21-fp32-nchw-batch2"),
    pytest.param(1, 6, 16, 16, 8, torch.float32, True, 3, id="16x16-fp32-cl-pixelsplit"),
    pytest.param(1, 5, 6, 6, 5, torch.float32, False, 0, id="6x6-smallest"),
    pytest.param(1, 3, 22, 11, 7, torch.float32, True, 0, id="22x11-tall-odd"),
    pytest.param(2, 40, 12, 12, 20, torch.float16, True, 2, id="12x12-fp16-cl"),
    pytest.param(1, 24, 9, 14, 16, torch.float16, False, 0, id="9x14-fp16-nchw"),
]


@pytest.mark.parametrize("n,c_in,h,w,c_out,dtype,channels_last,split", CASES)
def test_gpp_matches_reference(n, c_in, h, w, c_out, dtype, channels_last, split):
    m = make_gpp(c_in, c_out, dtype)
    x = make_input(n, c_in, h, w, dtype, channels_last)
    with torch.inference_mode():
        y = gpp_forward(x, m, pixel_split=split)
    ref = reference(m, x)
    assert_matches(y, ref, dtype)
    assert torch.equal(y[:, :c_in].float(), x.float())   # Res-5 is copied bit for bit
    assert (ref[:, c_in:] > 0).any()                      # ReLU did not zero every branch: the test can see them
    assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_gpp_writes_into_caller_buffer_without_copying_res5(channels_last):
    m = make_gpp(6, 8)
    x = make_input(2, 6, 13, 14, channels_last=channels_last)
    out, res5 = gpp_output_buffer(x, m)
    assert out.shape == (2, 6 + 4 * 8, 13, 14)
    res5.copy_(x)                       # the producer writes Res-5 straight into the concat buffer
    out[:, 6:].fill_(float("nan"))      # every other channel must be written by the kernel
    with torch.inference_mode():
        y = gpp_forward(res5, m, out=out)
    assert y is out
    assert_matches(y, reference(m, x), torch.float32)


def test_gpp_writes_into_separate_buffer_with_copy():
    m = make_gpp(6, 8)
    x = make_input(1, 6, 12, 12)
    out = torch.full((1, 38, 12, 12), float("nan"), device=DEV)
    with torch.inference_mode():
        gpp_forward(x, m, out=out)
    assert_matches(out, reference(m, x), torch.float32)


def test_gpp_weight_and_statistics_update_invalidates_packed_cache():
    m = make_gpp(5, 4)
    x = make_input(1, 5, 12, 12)
    with torch.inference_mode():
        gpp_forward(x, m)
        with torch.no_grad():
            m.branches[2][1].running_mean.add_(0.7)
            m.branches[0][0].weight.mul_(-1.0)
        y = gpp_forward(x, m)
    assert_matches(y, reference(m, x), torch.float32)


def test_triton_gpp_shares_parameters_and_keys():
    ref = make_gpp(5, 4)
    tri = use_triton(ref)
    assert isinstance(tri, TritonGPP)
    assert list(tri.state_dict()) == list(ref.state_dict())
    x = make_input(1, 5, 12, 13)
    with torch.inference_mode():
        assert_matches(tri(x), reference(ref, x), torch.float32)
    assert use_reference(tri) is ref


# --- what the launcher refuses ------------------------------------------------------------------------------

def test_training_mode_is_refused():
    m = make_gpp(5, 4).train()
    with torch.no_grad(), pytest.raises(ConfigError, match="training mode"):
        gpp_forward(make_input(2, 5, 12, 12), m)


def test_autograd_is_refused():
    m = make_gpp(5, 4)
    with pytest.raises(ConfigError, match="forward-only"):
        gpp_forward(make_input(1, 5, 12, 12), m)


def test_map_below_6x6_is_refused_like_the_reference():
    m = make_gpp(5, 4)
    x = make_input(1, 5, 5, 12)
    with torch.inference_mode():
        with pytest.raises(ConfigError, match="at least 6 x 6"):
            gpp_forward(x, m)
        with pytest.raises(ConfigError, match="at least 6 x 6"):
            m(x)


def test_too_many_bins_is_refused():
    m = make_gpp(2, 4)
    with torch.inference_mode(), pytest.raises(ConfigError, match="pooled bins"):
        gpp_forward(make_input(1, 2, 6, 200), m)   # base 1: 6 x 200 level-1 bins


def test_bad_out_buffers_are_refused():
    m = make_gpp(5, 4)
    x = make_input(1, 5, 12, 12)
    with torch.inference_mode():
        with pytest.raises(ConfigError, match="shape"):
            gpp_forward(x, m, out=torch.empty(1, 20, 12, 12, device=DEV))
        with pytest.raises(ConfigError):
            gpp_forward(x, m, out=torch.empty(1, 21, 12, 12, device=DEV, dtype=torch.float16))
        out, _ = gpp_output_buffer(x, m)
        with pytest.raises(ConfigError, match="overlaps"):
            gpp_forward(out[:, 1:6], m, out=out)   # inside the buffer but not its first C channels


def test_non_gpp_branch_is_refused():
    m = make_gpp(5, 4)
    m.branches[1][2] = torch.nn.Identity()
    with torch.inference_mode(), pytest.raises(ConfigError, match="Conv2d"):
        gpp_forward(make_input(1, 5, 12, 12), m)


# --- GPU: the paper's Res-5 and bfloat16 ----------------------------------------------------------------------

@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("channels_last", [True, False], ids=["cl", "nchw"])
@pytest.mark.parametrize("batch", [1, 4])
def test_gpp_paper_shape(dtype, channels_last, batch):
    m = make_gpp(2048, 512, dtype)
    x = make_input(batch, 2048, 64, 64, dtype, channels_last)
    with torch.inference_mode():
        y = gpp_forward(x, m)
        out, res5 = gpp_output_buffer(x, m)
        res5.copy_(x)
        y2 = gpp_forward(res5, m, out=out)
    ref = reference(m, x)
    assert_matches(y, ref, dtype)
    assert_matches(y2, ref, dtype)


# --- bench/bench_gpp.py: it needs a GPU to time anything, but every code path runs here -----------------------

def test_bench_gpp_dry_run_smoke_and_no_gpu_message(tmp_path, capsys):
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "bench_gpp.py"
    spec = importlib.util.spec_from_file_location("_bench_gpp", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--dry-run", "--batch", "1", "8"]) == 0
    planned = json.loads(capsys.readouterr().out)
    assert {(c["c_in"], c["side"], c["c_out"]) for c in planned["cases"]} == {(2048, 64, 512)}
    assert len(planned["cases"]) == 2 * 2 * 2
    if not HAS_CUDA:
        assert bench.main(["--batch", "1"]) == 2
        assert "no CUDA GPU" in capsys.readouterr().err
    out = tmp_path / "gpp.json"
    assert bench.main(["--smoke", "--batch", "1", "--dtype", "float32", "--layout", "channels_last",
                       "--out", str(out)]) == 0
    row = json.loads(out.read_text())["results"][0]
    assert row["max_rel_err"] < 1e-4 and row["triton_inplace_ms"] > 0
