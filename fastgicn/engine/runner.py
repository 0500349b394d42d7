"""The one device loop: host uint8 batches in, uint8 tumour probabilities out, in order.

    runner = DeviceRunner(backend_or_module, device, tile_size, depth=2)
    for item, probs in runner.run(batches):      # probs: numpy uint8 N x H x W (255 is p(tumour) = 1)
        ...

`batches` yields host uint8 N x H x W x 3 tensors (pinned with CUDA), or objects carrying one as `.tensor`
(a `BatchRing` batch); each is yielded back as `item` beside its probabilities. A plain `torch.nn.Module`
(from `create_model`, with `mean`/`std`) is served as the torch backend in fp32 eager, without a copy
(`as_backend`); anything else is an engine backend with `forward(uint8 batch on the device) -> logits`.

Per batch, with CUDA:
  1. host-to-device copy on a copy stream, an event recorded after it: once that event is done the host batch
     may be refilled (the runner waits on it before it asks `batches` for the next one);
  2. on a compute stream (torch's current stream inside it, so ONNX Runtime and TensorRT run there too):
     normalisation (constants on the device, made once per backend), forward, tumour probability
     (`tumour_probability_u8`: sigmoid(l1 - l0) for two classes, softmax otherwise) and quantisation to uint8;
  3. device-to-host copy of the N x H x W bytes into a slot of a pinned ring, on a third stream, an event after
     it.
`depth` batches are in flight (default 2): batch k + 1 is queued before the host waits for batch k's event,
so the GPU never waits for the host between two batches; the only host waits are those events.

On CPU the same steps run synchronously on the calling thread, at the least host cost: normalisation is one
table pass (`fastgicn.models.preprocess.Normalize`, bit-identical to the reference expression) into a reused
buffer, and the probabilities are quantised into a reused ring slot.

A yielded array is a view of the output ring: it stays valid until the consumer asks for the `hold`-th next
result (hold=1: use each result before asking for the next; a consumer that queues results to another thread
passes the queue's bound + 1). `seconds` holds host seconds per stage: normalise, forward, postprocess,
transfer (on CUDA the launches are asynchronous, so forward/postprocess are launch costs and the device time
shows in transfer: the wait for each batch's D2H event).
"""
from __future__ import annotations

import time
from collections import deque

import numpy as np
import torch

from ..errors import ConfigError

TUMOUR_CLASS = 1  # index of the tumour class in the model's logits
STAGES = ("normalise", "forward", "postprocess", "transfer")


def tumour_probability_u8(logits: torch.Tensor, tile_size: int | None = None, out: torch.Tensor | None = None
                          ) -> torch.Tensor:
    """N x C x H x W logits -> round(255 * softmax(logits)[:, 1]) as uint8 N x H x W, on the logits' device.

    Two classes: sigmoid(l1 - l0), which is softmax's class 1 for two logits (tests/test_runner.py checks the
    rounded values equal softmax-then-round); fewer passes over memory. `out` (uint8 N x H x W) is filled
    and returned when given.
    """
    if logits.dim() != 4 or logits.shape[1] <= TUMOUR_CLASS:
        raise ConfigError(f"the model returned logits of shape {tuple(logits.shape)}: expected N x C x H x W "
                          "with C >= 2 classes (0 normal, 1 tumour)")
    if tile_size is not None and tuple(logits.shape[2:]) != (tile_size, tile_size):
        raise ConfigError(f"the model returned {tuple(logits.shape[2:])} maps for {tile_size}-pixel tiles: it "
                          "must predict at the input resolution")
    if out is not None and logits.device.type == "cpu" and any(
            st == 0 and n > 1 for i, (st, n) in enumerate(zip(logits.stride(), logits.shape)) if i != 1):
        # logits broadcast along N, H or W (a model returning `expand`ed constants): the same elementwise
        # expression on the distinct values only, then broadcast into `out`: the same bytes, a fraction of
        # the passes over memory
        # (NumPy writes the bytes: one thread, where torch's intra-op pool would wake threads that the
        # reader threads are using)
        p = tumour_probability_u8(_collapse_broadcast(logits))
        dest = out.numpy()
        if p.shape[1:] == (1, 1):  # one value per tile: a fill
            for i, v in enumerate(p.view(-1).tolist() * (out.shape[0] if p.shape[0] == 1 else 1)):
                dest[i].fill(v)
        else:
            np.copyto(dest, p.expand_as(out).numpy())
        return out
    logits = logits.float()
    if logits.shape[1] == 2:
        p = torch.sub(logits[:, 1], logits[:, 0])
        torch.sigmoid(p, out=p)
    else:
        p = torch.softmax(logits, dim=1)[:, TUMOUR_CLASS]
    p = p.mul_(255.0).round_() if p.is_contiguous() else p.mul(255.0).round_()
    if out is None:
        return p.to(torch.uint8)
    return out.copy_(p)


def _collapse_broadcast(t: torch.Tensor) -> torch.Tensor:
    """`t` with every stride-0 dimension (a broadcast) but the class one reduced to size 1: its distinct
    elements, which `expand` gives back."""
    shape = [1 if (st == 0 and i != 1) else n for i, (st, n) in enumerate(zip(t.stride(), t.shape))]
    return t.as_strided(shape, t.stride(), t.storage_offset())


def as_backend(model, device) -> object:
    """An engine backend for `model`: itself when it has `forward` and is not a torch module, the torch backend
    around it (fp32 eager, the module itself moved to `device`, no copy) when it is a `torch.nn.Module`."""
    if isinstance(model, torch.nn.Module):
        from .torch_backend import TorchBackend

        return TorchBackend.wrap(model, device)
    if not callable(getattr(model, "forward", None)):
        raise ConfigError(f"model {type(model).__name__}: pass a torch module or an engine backend with "
                          "forward(batch) -> logits")
    return model


class DeviceRunner:
    """See the module docstring. `depth` >= 1 batches in flight with CUDA; `hold` results usable at once by the
    consumer; `batch_size` sizes the output ring (default: the backend's, grown when a larger batch comes)."""

    def __init__(self, backend, device, tile_size: int, depth: int = 2, *, hold: int = 1,
                 batch_size: int | None = None):
        from .base import resolve_device

        for name, v in (("depth", depth), ("hold", hold), ("tile_size", tile_size)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ConfigError(f"DeviceRunner {name}={v!r}: use a positive integer")
        self.device = resolve_device(device)
        self.backend = as_backend(backend, self.device)
        self.tile_size, self.depth, self.hold = int(tile_size), int(depth), int(hold)
        self.cuda = self.device.type == "cuda"
        self.batch_size = int(batch_size or getattr(self.backend, "batch_size", 0) or 1)
        # the torch and onnxruntime backends split normalisation from the forward (timed apart); the others
        # normalise inside forward (fused by the compiled backend)
        self._split = callable(getattr(self.backend, "preprocess", None)) and \
            callable(getattr(self.backend, "infer", None))
        self.seconds = {k: 0.0 for k in STAGES}
        self.batches = 0
        self.max_in_flight = 0
        self._ring: torch.Tensor | None = None
        if self.cuda:
            self.copy_stream = torch.cuda.Stream(self.device)
            # a backend bound to a stream of its own (ONNX Runtime's user_compute_stream) computes there
            self.compute_stream = getattr(self.backend, "compute_stream", None) or torch.cuda.Stream(self.device)
            self.d2h_stream = torch.cuda.Stream(self.device)

    @property
    def slots(self) -> int:
        """Output ring slots: the results in flight plus those the consumer may hold."""
        return self.depth + self.hold

    def _out_ring(self, n: int) -> torch.Tensor:
        if self._ring is None or self._ring.shape[1] < n:
            # a grown ring is a new tensor: views of the old one handed out or in flight keep it alive
            self.batch_size = max(self.batch_size, n)
            shape = (self.slots, self.batch_size, self.tile_size, self.tile_size)
            self._ring = torch.empty(shape, dtype=torch.uint8, pin_memory=self.cuda)
        return self._ring

    def run(self, batches):
        """Generator of (item, probs) in the order of `batches`; see the module docstring."""
        if self.cuda:
            return self._run_cuda(batches)
        return self._run_cpu(batches)

    # -- CPU: synchronous, least host work --------------------------------------------------------------
    def _run_cpu(self, batches):
        s = self.seconds
        k = 0
        for item in batches:
            host = _tensor_of(item)
            n = int(host.shape[0])
            if n == 0:
                yield item, np.empty((0, self.tile_size, self.tile_size), np.uint8)
                continue
            t0 = time.perf_counter()
            with torch.inference_mode():
                if self._split:
                    inp = self.backend.preprocess(host)
                    t1 = time.perf_counter()
                    logits = self.backend.infer(inp)
                else:
                    t1 = t0
                    logits = self.backend.forward(host)
                t2 = time.perf_counter()
                slot = self._out_ring(n)[k % self.slots, :n]
                tumour_probability_u8(logits, self.tile_size, out=slot)
            t3 = time.perf_counter()
            del logits
            s["normalise"] += t1 - t0
            s["forward"] += t2 - t1
            s["postprocess"] += t3 - t2
            self.batches += 1
            self.max_in_flight = 1
            k += 1
            yield item, slot.numpy()

    # -- CUDA: copy / compute / copy-back streams, `depth` batches in flight -------------------------------
    def _submit(self, k: int, host: torch.Tensor):
        s = self.seconds
        t0 = time.perf_counter()
        n = int(host.shape[0])
        with torch.cuda.stream(self.copy_stream):
            dev = torch.empty(tuple(host.shape), dtype=torch.uint8, device=self.device)
            dev.copy_(host, non_blocking=True)
            h2d = torch.cuda.Event()
            h2d.record(self.copy_stream)
        self.compute_stream.wait_event(h2d)
        dev.record_stream(self.compute_stream)  # freed by the allocator only after the compute stream used it
        t1 = time.perf_counter()
        with torch.cuda.stream(self.compute_stream), torch.inference_mode():
            if self._split:
                logits = self.backend.infer(self.backend.preprocess(dev))
            else:
                logits = self.backend.forward(dev)
            t2 = time.perf_counter()
            probs = tumour_probability_u8(logits, self.tile_size)
            ready = torch.cuda.Event()
            ready.record(self.compute_stream)
        del logits, dev
        slot = self._out_ring(n)[k % self.slots, :n]
        self.d2h_stream.wait_event(ready)
        with torch.cuda.stream(self.d2h_stream):
            slot.copy_(probs, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.d2h_stream)
        probs.record_stream(self.d2h_stream)
        t3 = time.perf_counter()
        s["transfer"] += (t1 - t0) + (t3 - t2)
        s["forward"] += t2 - t1
        return h2d, done, slot

    def _collect(self, entry):
        item, _h2d, done, slot = entry
        t0 = time.perf_counter()
        done.synchronize()
        self.seconds["transfer"] += time.perf_counter() - t0
        self.batches += 1
        return item, slot.numpy()

    def _run_cuda(self, batches):
        inflight: deque = deque()
        it = iter(batches)
        k = 0
        try:
            # the compute stream may read what the caller queued on its stream before (e.g. weights)
            self.compute_stream.wait_stream(torch.cuda.current_stream(self.device))
            while True:
                if inflight:  # the source may refill the host batch once its copy is done
                    t0 = time.perf_counter()
                    inflight[-1][1].synchronize()
                    self.seconds["transfer"] += time.perf_counter() - t0
                try:
                    item = next(it)
                except StopIteration:
                    break
                host = _tensor_of(item)
                if host.shape[0] == 0:
                    while inflight:  # keep the order: everything before it first
                        yield self._collect(inflight.popleft())
                    yield item, np.empty((0, self.tile_size, self.tile_size), np.uint8)
                    continue
                if not host.is_pinned():
                    host = host.pin_memory()  # an asynchronous copy needs page-locked memory
                inflight.append((item, *self._submit(k, host)))
                k += 1
                self.max_in_flight = max(self.max_in_flight, len(inflight))
                while len(inflight) >= self.depth:
                    yield self._collect(inflight.popleft())
            while inflight:
                yield self._collect(inflight.popleft())
        finally:
            if inflight:  # stopped early (error, consumer gone): let queued copies land before buffers go
                for stream in (self.copy_stream, self.compute_stream, self.d2h_stream):
                    stream.synchronize()
            torch.cuda.current_stream(self.device).wait_stream(self.d2h_stream)


def _tensor_of(item) -> torch.Tensor:
    t = item if isinstance(item, torch.Tensor) else getattr(item, "tensor", None)
    if isinstance(t, np.ndarray):
        t = torch.from_numpy(t)
    if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8 or t.dim() != 4 or t.shape[-1] != 3:
        raise ConfigError(f"DeviceRunner: batches must be uint8 N x H x W x 3 tensors (or carry one as .tensor), "
                          f"got {type(item).__name__} {tuple(getattr(t, 'shape', ()))}")
    return t
