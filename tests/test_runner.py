"""The device runner: probabilities equal the reference (softmax of the torch module's logits, rounded), order
kept at every depth, errors propagate with nothing left behind, the zero-cost path, and (GPU) batches in flight."""
import threading

import numpy as np
import pytest
import torch
from torch import nn

from fastgicn.engine.runner import DeviceRunner, tumour_probability_u8
from fastgicn.errors import ConfigError
from fastgicn.models import create_model
from fastgicn.models.preprocess import Normalize, to_model_input

pytestmark = pytest.mark.usefixtures("one_torch_thread")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none visible to torch)")


class ZeroCost(nn.Module):
    """Constant logits (normal 1, tumour 0): what the host costs when the model costs nothing."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]))
        self.register_buffer("logits", torch.tensor([1.0, 0.0]).view(1, 2, 1, 1))

    def forward(self, x):
        n, _, h, w = x.shape
        return self.logits.expand(n, 2, h, w)


class TileMean(nn.Module):
    """Tumour logit from each tile's mean normalised value (tells tiles apart), plus a local 3x3 term."""

    def __init__(self, fail_at=None):
        super().__init__()
        self.mean, self.std = (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)
        self.conv = nn.Conv2d(3, 2, 3, padding=1)
        self.calls, self.fail_at = 0, fail_at

    def forward(self, x):
        self.calls += 1
        if self.fail_at is not None and self.calls >= self.fail_at:
            raise RuntimeError("model failed (test)")
        z = self.conv(x)
        return z + x.mean(dim=(1, 2, 3), keepdim=True) * torch.tensor([0.0, 3.0]).view(1, 2, 1, 1)


def pixels(n, t, seed):
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, t, t, 3), dtype=np.uint8))


def reference_u8(module, x):
    """softmax-then-round of the module's logits, the definition."""
    with torch.no_grad():
        p = torch.softmax(module(to_model_input(x, module.mean, module.std)).float(), dim=1)[:, 1]
    return (p * 255).round().to(torch.uint8).numpy()


def test_table_normalisation_is_bit_identical_to_the_reference():
    norm = Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    x = pixels(3, 64, 0)
    ref = to_model_input(x, norm.mean, norm.std)
    assert torch.equal(norm(x), ref)
    buf = torch.empty(ref.shape)
    assert norm(x, out=buf) is buf and torch.equal(buf, ref)
    assert torch.equal(norm(x[:, :48, :40]), to_model_input(x[:, :48, :40], norm.mean, norm.std))  # strided
    assert torch.equal(norm(x, torch.bfloat16), to_model_input(x, norm.mean, norm.std, torch.bfloat16))


def test_two_class_shortcut_equals_softmax_then_round():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 2, 128, 128, generator=g) * 6
    logits[0, :, 0, :5] = torch.tensor([[0.0, 1.0, -1.0, 30.0, -30.0], [0.0, -1.0, 1.0, -30.0, 30.0]])
    ref = (torch.softmax(logits, 1)[:, 1] * 255).round().to(torch.uint8)
    assert torch.equal(tumour_probability_u8(logits), ref)
    three = torch.randn(2, 3, 16, 16, generator=g)
    ref3 = (torch.softmax(three, 1)[:, 1] * 255).round().to(torch.uint8)
    assert torch.equal(tumour_probability_u8(three), ref3)
    with pytest.raises(ConfigError, match="C >= 2"):
        tumour_probability_u8(torch.zeros(1, 1, 8, 8))
    with pytest.raises(ConfigError, match="input resolution"):
        tumour_probability_u8(torch.zeros(1, 2, 8, 8), tile_size=16)


def test_plain_module_equals_the_reference():
    torch.manual_seed(0)
    model = create_model("resnet50_gicn_gpp", width=0.0625).eval()
    batches = [pixels(2, 64, s) for s in range(3)]
    runner = DeviceRunner(model, "cpu", 64)
    out = [(b, p.copy()) for b, p in runner.run(batches)]
    assert [b for b, _ in out] == batches  # items come back as given, in order
    for b, p in out:
        np.testing.assert_array_equal(p, reference_u8(model, b))
    assert set(runner.seconds) == {"normalise", "forward", "postprocess", "transfer"}
    assert runner.backend.model is model  # served as it is: no copy


def test_onnxruntime_backend_equals_the_reference():
    pytest.importorskip("onnxruntime")
    from fastgicn.engine.onnxruntime_backend import OnnxRuntimeBackend

    torch.manual_seed(0)
    model = create_model("resnet50_gicn_gpp", width=0.0625).eval()
    backend = OnnxRuntimeBackend(model, batch_size=2, threads=1)
    batches = [pixels(2, 64, s) for s in range(2)]
    for b, p in DeviceRunner(backend, "cpu", 64).run(batches):
        ref = reference_u8(model, b)
        diff = np.abs(p.astype(int) - ref)
        assert diff.max() <= 1 and (diff == 0).mean() > 0.999  # fp32 graph vs eager: rounding at most


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_order_is_kept_at_every_depth(depth):
    torch.manual_seed(1)
    model = TileMean()
    batches = [pixels(int(n), 48, s) for s, n in enumerate([3, 1, 2, 3, 2])]
    seen = []
    runner = DeviceRunner(model, "cpu", 48, depth=depth, hold=len(batches))
    for b, p in runner.run(iter(batches)):
        seen.append((b, p))
    assert [b for b, _ in seen] == batches
    for b, p in seen:  # hold = all: every result still valid at the end
        np.testing.assert_array_equal(p, reference_u8(model, b))


def test_results_stay_valid_for_hold_results():
    model = TileMean()
    batches = [pixels(2, 48, s) for s in range(6)]
    kept = []
    for b, p in DeviceRunner(model, "cpu", 48, hold=2).run(batches):
        kept.append((b, p))
        for bb, pp in kept[-2:]:
            np.testing.assert_array_equal(pp, reference_u8(model, bb))


def test_empty_and_object_batches():
    class Item:
        def __init__(self, t):
            self.tensor = t

    items = [Item(pixels(2, 48, 0)), Item(pixels(0, 48, 1)), Item(pixels(1, 48, 2))]
    out = list(DeviceRunner(ZeroCost(), "cpu", 48).run(items))
    assert [i for i, _ in out] == items and [p.shape[0] for _, p in out] == [2, 0, 1]
    with pytest.raises(ConfigError, match="uint8"):
        list(DeviceRunner(ZeroCost(), "cpu", 48).run([torch.zeros(1, 48, 48, 3)]))


def test_a_model_error_propagates_and_leaves_no_thread():
    before = set(threading.enumerate())
    runner = DeviceRunner(TileMean(fail_at=2), "cpu", 48)
    gen = runner.run([pixels(1, 48, s) for s in range(4)])
    next(gen)
    with pytest.raises(RuntimeError, match="model failed"):
        next(gen)
    assert set(threading.enumerate()) <= before


def test_a_model_error_in_segment_slide_leaves_no_thread_or_file(tmp_path):
    from fastgicn.config import TileConfig
    from fastgicn.pipeline import segment_slide

    img = np.random.default_rng(0).integers(0, 200, (200, 260, 3), dtype=np.uint8)
    with pytest.raises(RuntimeError, match="model failed"):
        segment_slide(img, tmp_path, TileMean(fail_at=3), TileConfig(tile_size=64, batch_size=2,
                                                                   tissue_prefilter=False), progress=False)
    assert not [t for t in threading.enumerate() if t.name.startswith("fastgicn-")]
    assert list(tmp_path.iterdir()) == []


def test_zero_cost_model_path():
    runner = DeviceRunner(ZeroCost(), "cpu", 64)
    out = [p.copy() for _, p in runner.run([pixels(4, 64, s) for s in range(3)])]
    expect = round(255 / (1 + np.e))  # sigmoid(0 - 1) * 255 = 68.6
    assert all((p == expect).all() for p in out) and runner.batches == 3
    assert runner.seconds["forward"] < runner.seconds["normalise"] + runner.seconds["postprocess"] + 1


def test_bad_arguments():
    with pytest.raises(ConfigError, match="depth"):
        DeviceRunner(ZeroCost(), "cpu", 64, depth=0)
    with pytest.raises(ConfigError, match="mean"):
        DeviceRunner(nn.Conv2d(3, 2, 1), "cpu", 64)
    with pytest.raises(ConfigError, match="forward"):
        DeviceRunner(object(), "cpu", 64)


# -- GPU -------------------------------------------------------------------------------------------------

class SlowOnGpu(nn.Module):
    """TileMean with a fixed GPU delay per forward (torch.cuda._sleep), to see what is in flight."""

    def __init__(self, inner, cycles=20_000_000):
        super().__init__()
        self.inner, self.cycles = inner, cycles
        self.mean, self.std = inner.mean, inner.std

    def forward(self, x):
        torch.cuda._sleep(self.cycles)
        return self.inner(x)


@cuda
@pytest.mark.cuda
def test_gpu_keeps_two_batches_in_flight_and_equals_cpu():
    torch.manual_seed(0)
    inner = TileMean()
    batches = [pixels(2, 64, s).pin_memory() for s in range(6)]
    ref_model = TileMean()
    ref_model.load_state_dict(inner.state_dict())
    cpu_out = [p.copy() for _, p in DeviceRunner(ref_model, "cpu", 64, hold=8).run(batches)]
    runner = DeviceRunner(SlowOnGpu(inner), "cuda", 64, depth=2)
    for k, (b, p) in enumerate(runner.run(batches)):
        assert b is batches[k]
        diff = np.abs(p.astype(int) - cpu_out[k])
        assert diff.max() <= 1 and (diff == 0).mean() > 0.999
    assert runner.max_in_flight >= 2 and runner.batches == len(batches)


@cuda
@pytest.mark.cuda
def test_gpu_next_batch_is_queued_before_the_host_waits():
    inner = TileMean().cuda()
    events = []

    class Spy(SlowOnGpu):
        def forward(self, x):
            out = super().forward(x)
            e = torch.cuda.Event()
            e.record()
            events.append(e)
            return out

    runner = DeviceRunner(Spy(inner), "cuda", 64, depth=2)
    for k, _ in enumerate(runner.run([pixels(2, 64, s).pin_memory() for s in range(4)])):
        if k + 1 < 4:
            assert len(events) >= k + 2  # batch k + 1's forward was launched before batch k was waited for
            assert not events[k + 1].query()  # and it is still running: two batches in flight


@cuda
@pytest.mark.cuda
def test_gpu_onnxruntime_on_the_runner_stream_equals_cpu():
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("needs onnxruntime-gpu (CUDAExecutionProvider)")
    from fastgicn.engine.onnxruntime_backend import OnnxRuntimeBackend

    torch.manual_seed(0)
    model = create_model("resnet50_gicn_gpp", width=0.0625).eval()
    backend = OnnxRuntimeBackend(model, device="cuda", batch_size=2)
    batches = [pixels(2, 64, s) for s in range(4)]
    runner = DeviceRunner(backend, "cuda", 64)
    assert runner.compute_stream is backend.compute_stream
    for b, p in runner.run([x.pin_memory() for x in batches]):
        diff = np.abs(p.astype(int) - reference_u8(model, b.cpu()))
        assert diff.max() <= 1 and (diff == 0).mean() > 0.99
