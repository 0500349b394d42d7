"""The compiled backend: channels-last, 16-bit weights, Triton GICN/GPP kernels, torch.compile, CUDA graphs.

On a CUDA GPU, one `prepare((H, W))` builds, per tile size and per batch size in `graph_batch_sizes`:
  1. the model in channels-last memory format with fp16/bf16 weights (Tensor-core friendly: cuDNN/Triton
     convolutions read NHWC without transposes);
  2. the Triton GICN and GPP kernels swapped in for the reference modules (`fastgicn.kernels.use_triton`) when
     that package imports; they run eagerly between compiled regions (`torch.compiler.disable`): their Python
     launchers keep packed-weight caches that Dynamo should not trace;
  3. `torch.compile` (Inductor, frozen weights so conv+BN fold, max-autotune without Inductor's own CUDA
     graphs) of normalisation + network, one static shape per tile size (`dynamic=False`);
  4. one CUDA graph per fixed batch size, captured around the whole step (uint8 NHWC in a static buffer ->
     logits in a static buffer): a batch-1 forward of ~200 kernels becomes one launch, which is what makes
     batch-1 latency approach the GPU time. Smaller batches are padded up to the next captured size.

On CPU: channels-last + torch.compile (Inductor's C++ backend, needs a C++ compiler), fp32 or bf16, no Triton, no
CUDA graphs, batch dimension left to Dynamo's automatic dynamic shapes (static first, one dynamic recompile, and
batch 1 specialised). Each compile takes 20-80 s on a loaded 2-core machine, so this is not `auto`'s CPU choice.

`description` says which of these were used and why any was left out.
"""
from __future__ import annotations

import shutil
import time

import torch
from torch import nn

from ..errors import BackendUnavailable, ConfigError, EngineBuildError
from ..models.preprocess import _normalise
from .base import Backend, reference_copy

# Inductor options on a GPU: "max-autotune-no-cudagraphs" (we capture our own graphs, per batch size) + freezing.
GPU_INDUCTOR_OPTIONS = {"max_autotune": True, "coordinate_descent_tuning": True, "triton.cudagraphs": False,
                        "freezing": True}
CPU_INDUCTOR_OPTIONS = {"freezing": True}


def _disable_dynamo_on_triton_modules(model: nn.Module) -> int:
    """Run the Triton GICN/GPP modules eagerly inside a compiled model (a graph break around each)."""
    count = 0
    for module in model.modules():
        if type(module).__name__ in ("TritonGICN", "TritonGPP"):
            module.forward = torch.compiler.disable(module.forward, recursive=True)
            count += 1
    return count


class CompiledBackend(Backend):
    name = "compiled"

    def __init__(self, model: nn.Module, *, precision: str = "fp16", device="cuda", batch_size: int = 8,
                 triton: bool | None = None, cuda_graphs: bool | None = None, channels_last: bool = True,
                 compile_backend: str = "inductor", compile_options: dict | None = None,
                 graph_batch_sizes: tuple[int, ...] | None = None):
        super().__init__(model, precision=precision, device=device, batch_size=batch_size)
        on_gpu = self.device.type == "cuda"
        if not on_gpu and precision == "fp16":
            raise BackendUnavailable("compiled backend: fp16 needs a CUDA GPU; use precision='fp32' or 'bf16' "
                                     "on CPU")
        if compile_backend == "inductor" and not on_gpu and shutil.which("c++") is None \
                and shutil.which("g++") is None and shutil.which("clang++") is None:
            raise BackendUnavailable("compiled backend on CPU: torch.compile's Inductor needs a C++ compiler and "
                                     "none was found on PATH; install g++ (apt-get install g++) or use "
                                     "backend='torch' or 'onnxruntime'")
        self.compile_backend = compile_backend
        self.channels_last = channels_last
        if on_gpu:
            torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN time its convolution algorithms
        self.model = reference_copy(model)
        self.triton_used = False
        if triton is None:
            triton = on_gpu
        if triton and not on_gpu:
            raise BackendUnavailable("compiled backend: the Triton GICN/GPP kernels need a CUDA GPU; use "
                                     "triton=False on CPU")
        if triton:
            try:
                from fastgicn.kernels import use_triton
            except ImportError as exc:
                self.notes.append(f"Triton kernels not used (fastgicn.kernels did not import: {exc})")
            else:
                self.model = use_triton(self.model)
                n = _disable_dynamo_on_triton_modules(self.model)
                self.triton_used = n > 0
                self.notes.append(f"Triton GICN/GPP kernels ({n} modules, eager between compiled regions)")
        else:
            self.notes.append("Triton kernels not used" + ("" if on_gpu else " (they need CUDA)"))
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model = self.model.to(self.device, self.dtype, memory_format=memory_format).eval()
        self._norm_constants = self.norm.constants(self.dtype, self.device)
        for p in self.model.parameters():
            p.requires_grad_(False)
        if channels_last:
            self.notes.append("channels-last")
        if compile_backend == "none":
            self._step = self._eager_step
            self.notes.append("not compiled (compile_backend='none')")
        else:
            if compile_options is None:
                compile_options = (GPU_INDUCTOR_OPTIONS if on_gpu else CPU_INDUCTOR_OPTIONS) \
                    if compile_backend == "inductor" else None
            # GPU: one static shape per captured batch size (autotuned per shape, then graphed). CPU: Dynamo's
            # automatic dynamic shapes, so a new batch size costs at most one more compile (not one each).
            kwargs = {"backend": compile_backend, "dynamic": False if on_gpu else None}
            if compile_options:
                kwargs["options"] = dict(compile_options)
            self._step = torch.compile(self._eager_step, **kwargs)
            opts = ", ".join(f"{k}={v}" for k, v in (compile_options or {}).items())
            self.notes.append(f"torch.compile(backend={compile_backend}{', ' + opts if opts else ''})")
        if cuda_graphs is None:
            cuda_graphs = on_gpu
        if cuda_graphs and not on_gpu:
            raise BackendUnavailable("compiled backend: CUDA graphs need a CUDA GPU; use cuda_graphs=False on CPU")
        self.cuda_graphs = cuda_graphs
        sizes = graph_batch_sizes or tuple(sorted({1, batch_size}))
        if any(not isinstance(b, int) or b < 1 or b > batch_size for b in sizes):
            raise ConfigError(f"graph_batch_sizes={graph_batch_sizes!r}: use positive sizes up to "
                              f"batch_size={batch_size}")
        self.graph_batch_sizes = tuple(sorted(set(sizes) | {batch_size}))
        if cuda_graphs:
            self.notes.append(f"CUDA graphs for batch {', '.join(map(str, self.graph_batch_sizes))}")
            self._pool = None
        # (B, H, W, input dtype) -> (graph, static in, static out, what the graph reads from caches)
        self._graphs: dict[tuple, tuple] = {}
        self.build_seconds: dict[tuple, float] = {}

    def _eager_step(self, x: torch.Tensor) -> torch.Tensor:
        # the constants are the backend's own device tensors (made in __init__): nothing is copied from host
        # memory inside a forward, so the step compiles to one fused kernel and captures in a CUDA graph
        mean_t, std_t = self._norm_constants
        inp = _normalise(x, mean_t, std_t, self.dtype)
        if self.channels_last:
            inp = inp.contiguous(memory_format=torch.channels_last)
        return self.model(inp)

    # -- building -------------------------------------------------------------------------------------------
    def prepare(self, size: tuple[int, int], input_dtype: torch.dtype = torch.uint8) -> None:
        """Compile (and capture the CUDA graphs) for one tile size, so no request pays for it."""
        h, w = size
        for b in (self.graph_batch_sizes if self.cuda_graphs else (self.batch_size,)):
            example = self._example(b, h, w, input_dtype)
            if self.cuda_graphs:
                self._graph_for(example)
            else:
                key = (b, h, w, input_dtype)
                if key not in self.build_seconds:
                    t0 = time.perf_counter()
                    self._run_step(example)
                    self.build_seconds[key] = time.perf_counter() - t0

    def _example(self, b: int, h: int, w: int, input_dtype: torch.dtype) -> torch.Tensor:
        g = torch.Generator(device="cpu").manual_seed(0)
        if input_dtype == torch.uint8:
            return torch.randint(0, 256, (b, h, w, 3), dtype=torch.uint8, generator=g).to(self.device)
        return torch.rand((b, 3, h, w), generator=g).to(self.device, input_dtype)

    def _run_step(self, x: torch.Tensor) -> torch.Tensor:
        try:
            with torch.inference_mode():
                return self._step(x)
        except (BackendUnavailable, ConfigError):
            raise
        except Exception as exc:  # Dynamo/Inductor raise many types; name the stage and the way out
            raise EngineBuildError(f"compiled backend: torch.compile failed for input {tuple(x.shape)} "
                                   f"{x.dtype} ({type(exc).__name__}: {str(exc).splitlines()[0][:300]}); "
                                   "use backend='torch' (eager) or compile_backend='aot_eager' to narrow it "
                                   "down") from exc

    def _graph_for(self, x: torch.Tensor):
        """The CUDA graph for x's (batch, size, dtype), capturing it on first use (warm-up on a side stream)."""
        key = (x.shape[0],) + self._hw(x) + (x.dtype,)
        entry = self._graphs.get(key)
        if entry is not None:
            return entry
        t0 = time.perf_counter()
        static_in = x.clone()
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(3):  # compile, autotune and Triton JIT happen here, never inside the capture
                self._run_step(static_in)
        torch.cuda.current_stream(self.device).wait_stream(side)
        torch.cuda.synchronize(self.device)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.inference_mode(), torch.cuda.graph(graph, pool=self._pool):
                static_out = self._step(static_in)
        except Exception as exc:
            raise EngineBuildError(f"compiled backend: CUDA graph capture failed for batch {x.shape[0]} "
                                   f"({type(exc).__name__}: {str(exc).splitlines()[0][:300]}); use "
                                   "cuda_graphs=False") from exc
        # the graph replays raw device pointers: everything it reads must outlive it. The static buffers and
        # the normalisation constants are ours; the Triton kernels' packed weights and per-shape geometry live
        # in caches that evict (kernels/gpp.py clears its geometry cache after 64 shapes), so hold them here.
        entry = (graph, static_in, static_out, (self._norm_constants, self._kernel_state()))
        self._graphs[key] = entry
        self.build_seconds[key] = time.perf_counter() - t0
        return entry

    def _kernel_state(self) -> list:
        """Strong references to what the Triton kernels read from their caches for this model: packed weights
        (per module) and the GPP geometry tables (per shape)."""
        if not self.triton_used:
            return []
        import importlib

        held = []
        for name in ("fastgicn.kernels.gicn", "fastgicn.kernels.gpp"):
            try:
                mod = importlib.import_module(name)
            except ImportError:
                continue
            cache = getattr(mod, "_PACK_CACHE", None)
            if cache is not None:
                held.extend(e for e in (cache.get(m) for m in self.model.modules()) if e is not None)
            geometry = getattr(mod, "_GEOMETRY", None)
            if geometry:
                held.append(dict(geometry))  # a copy: the tensors stay alive whatever the cache evicts
        return held

    @staticmethod
    def _hw(x: torch.Tensor) -> tuple[int, int]:
        return (x.shape[1], x.shape[2]) if x.dtype == torch.uint8 else (x.shape[2], x.shape[3])

    # -- running --------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        if n > self.batch_size:
            raise ConfigError(f"compiled backend: batch of {n} exceeds batch_size={self.batch_size}")
        if not self.cuda_graphs:
            return self._run_step(x)
        b = next(s for s in self.graph_batch_sizes if s >= n)
        if b != n:  # pad up to the captured size; the padding rows are computed and dropped
            pad = x.new_empty((b - n,) + tuple(x.shape[1:]))
            pad.copy_(x[:1].expand_as(pad))
            x = torch.cat([x, pad])
        graph, static_in, static_out, _held = self._graph_for(x)
        static_in.copy_(x, non_blocking=True)
        graph.replay()
        # the static output is overwritten by the next replay: hand out a copy (2 channels, ~1 MB per fp16 tile)
        return static_out[:n].clone()
