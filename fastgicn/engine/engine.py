"""`Engine`: one model, one backend, one precision, one device; tiles in, logits / labels / probabilities out.

    engine = Engine("runs/train/last.pt")                # backend="auto": the fastest that works here
    print(engine.describe())                             # which backend, why, and what fell back
    labels = engine.predict(tiles_uint8_nhwc, output="labels")
    stream = engine.stream(width=l0_w, height=l0_h)       # scanner pipelines: see fastgicn.engine.streaming
    engine.segment_slide("slide.svs", "out/")             # the whole-slide pipeline (fastgicn.pipeline)

`auto` tries, in order, the backends that are fastest on the device (GPU: tensorrt, compiled, onnxruntime,
torch; CPU: onnxruntime, torch - see AUTO_ORDER for the reasons), builds each for the tile size, checks one
random batch against the fp32 torch reference, and keeps the first that passes; every skipped candidate and
why is kept in `engine.selection` and in `describe()`.
"""
from __future__ import annotations

import inspect
import logging
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import BackendUnavailable, ConfigError, EngineBuildError
from .base import (PRECISIONS, TOLERANCE, check_batch, check_precision, model_fingerprint, reference_copy,
                   relative_error, resolve_device)

log = logging.getLogger("fastgicn.engine")

BACKENDS = ("torch", "compiled", "onnxruntime", "tensorrt")
OUTPUTS = ("logits", "labels", "probabilities")
# The order `auto` tries, fastest first, and why it ranks there.
AUTO_ORDER = {
    "cuda": [
        ("tensorrt", "TensorRT builds an engine timed layer by layer for this GPU, with conv+BN+ReLU fused"),
        ("compiled", "torch.compile (max-autotune, frozen weights), channels-last, Triton GICN/GPP kernels and "
                     "CUDA graphs: no extra package needed"),
        ("onnxruntime", "ONNX Runtime's CUDA provider: fused convolutions, no compile step"),
        ("torch", "eager PyTorch: the reference, always available"),
    ],
    "cpu": [
        ("onnxruntime", "ONNX Runtime's CPU provider: 1.5-1.7x eager PyTorch per patch thread for thread, and "
                        "no OpenMP stalls on shared cores (bench/results/engine_cpu_interleaved*.json); no "
                        "compile step"),
        ("torch", "eager PyTorch: the reference, always available"),
        # `compiled` is left out on CPU: Inductor's C++ compile costs 20-80 s per shape on the machines we
        # measured, more than it saves on a typical job; ask for backend='compiled' to use it.
    ],
}


def _load_model(model_or_checkpoint) -> tuple[nn.Module, dict]:
    """(fp32 CPU eval reference model, tile_config dict or {})."""
    if isinstance(model_or_checkpoint, nn.Module):
        model = model_or_checkpoint
        for name in ("mean", "std"):
            if not hasattr(model, name):
                raise ConfigError(f"model {type(model).__name__} has no `{name}`: build it with "
                                  "fastgicn.models.create_model or load a checkpoint")
        return reference_copy(model).cpu().eval(), {}
    from ..checkpoint import load_checkpoint, model_from_checkpoint

    if isinstance(model_or_checkpoint, dict):
        payload = model_or_checkpoint
    elif isinstance(model_or_checkpoint, (str, Path)):
        payload = load_checkpoint(model_or_checkpoint)
    else:
        raise ConfigError(f"Engine needs a model (nn.Module), a checkpoint path or a loaded checkpoint dict, "
                          f"not {type(model_or_checkpoint).__name__}")
    return model_from_checkpoint(payload, "cpu"), dict(payload.get("tile_config") or {})


def backend_class(name: str):
    """The class behind a backend name (imports only that backend's module)."""
    if name == "torch":
        from .torch_backend import TorchBackend
        return TorchBackend
    if name == "compiled":
        from .compiled import CompiledBackend
        return CompiledBackend
    if name == "onnxruntime":
        from .onnxruntime_backend import OnnxRuntimeBackend
        return OnnxRuntimeBackend
    if name == "tensorrt":
        from .tensorrt_backend import TensorRTBackend
        return TensorRTBackend
    raise ConfigError(f"backend={name!r}: use 'auto' or one of {', '.join(BACKENDS)}")


def backend_option_names(name: str) -> set[str]:
    """Keyword options a backend takes beyond the shared ones."""
    params = inspect.signature(backend_class(name).__init__).parameters
    return {p for p in params if p not in ("self", "model", "precision", "device", "batch_size")}


def create_backend(name: str, model: nn.Module, *, precision: str, device: torch.device, batch_size: int,
                   **options):
    """Instantiate one backend by name (BackendUnavailable when it cannot run here)."""
    unknown = sorted(set(options) - backend_option_names(name))
    if unknown:
        raise ConfigError(f"backend {name!r} takes no option(s) {unknown}; it takes "
                          f"{sorted(backend_option_names(name))}")
    return backend_class(name)(model, precision=precision, device=device, batch_size=batch_size, **options)


def postprocess(logits: torch.Tensor, output: str) -> torch.Tensor:
    if output == "logits":
        return logits.float()
    if output == "labels":
        return logits.argmax(dim=1).to(torch.uint8)
    if output == "probabilities":
        return torch.softmax(logits.float(), dim=1)
    raise ConfigError(f"output={output!r}: use one of {', '.join(OUTPUTS)}")


class Engine:
    """Run a segmentation model on tiles with the backend, precision and device asked for (or the best here).

    model_or_checkpoint: a model from `fastgicn.models.create_model`, or a checkpoint (path or loaded dict).
    backend: "auto" or one of BACKENDS. precision: "fp16" | "bf16" | "fp32" | "auto" (fp16 on a GPU, fp32 on CPU).
    batch_size: tiles per forward (default: the checkpoint's tile config, else 8).
    tile_size: the side the backend is built for up front (default: checkpoint's, else 512); other sizes that
        are multiples of 8 (>= 48) work and are built on first use.
    verify: check one random batch against the fp32 torch reference after building (default: on for auto).
    backend_options: passed to the backend (e.g. compile_backend=, cuda_graphs=, providers=, cache_dir=).
    """

    def __init__(self, model_or_checkpoint, backend: str = "auto", precision: str = "auto",
                 batch_size: int | None = None, device=None, *, tile_size: int | None = None,
                 verify: bool | None = None, **backend_options):
        self.model, tile_config = _load_model(model_or_checkpoint)
        self.device = resolve_device(device)
        if precision in (None, "auto"):
            precision = "fp16" if self.device.type == "cuda" else "fp32"
        self.precision = check_precision(precision)
        self.batch_size = int(batch_size or tile_config.get("batch_size", 8))
        if self.batch_size < 1:
            raise ConfigError(f"batch_size={batch_size!r}: use a positive integer")
        self.tile_size = int(tile_size or tile_config.get("tile_size", 512))
        if self.tile_size % 8 or self.tile_size < 48:
            raise ConfigError(f"tile_size={self.tile_size}: use a multiple of 8 of at least 48 (512 is the paper's)")
        self.tile_config = tile_config
        self.num_classes = int(self.model.head.out_channels)
        self.selection: list[dict] = []
        if backend == "auto":
            candidates = AUTO_ORDER["cuda" if self.device.type == "cuda" else "cpu"]
            verify = True if verify is None else verify
        elif backend in BACKENDS:
            candidates = [(backend, "asked for by name")]
        else:
            raise ConfigError(f"backend={backend!r}: use 'auto' or one of {', '.join(BACKENDS)}")
        self.requested_backend = backend
        self.backend = None
        self.build_seconds = 0.0
        if backend == "auto" and backend_options:  # options go to the candidates that take them
            known = set().union(*(backend_option_names(n) for n, _ in candidates))
            unknown = sorted(set(backend_options) - known)
            if unknown:
                raise ConfigError(f"no backend takes option(s) {unknown}")
        for name, why in candidates:
            t0 = time.perf_counter()
            options = backend_options
            if backend == "auto":
                options = {k: v for k, v in backend_options.items() if k in backend_option_names(name)}
            try:
                candidate = create_backend(name, self.model, precision=self.precision, device=self.device,
                                           batch_size=self.batch_size, **options)
                candidate.prepare((self.tile_size, self.tile_size))
                error = self._verify(candidate) if verify else None
                if error is not None:
                    raise EngineBuildError(error)
            except Exception as exc:
                # asked for by name: the error goes to the caller as it is. auto: any failure to build or to
                # match the reference (a bug in a path this machine cannot run included) means the next one.
                expected = isinstance(exc, (BackendUnavailable, EngineBuildError))
                if backend != "auto" or isinstance(exc, ConfigError):
                    raise
                status = "unavailable" if isinstance(exc, BackendUnavailable) else "failed"
                reason = str(exc) if expected else f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
                self.selection.append({"backend": name, "status": status, "reason": reason})
                (log.warning if status == "failed" else log.info)("backend %s %s: %s", name, status, reason)
                continue
            self.build_seconds = time.perf_counter() - t0
            self.selection.append({"backend": name, "status": "chosen", "reason": why})
            self.backend = candidate
            break
        if self.backend is None:
            reasons = "; ".join(f"{s['backend']}: {s['reason']}" for s in self.selection)
            raise BackendUnavailable(f"no backend can run {self.model_name} at {self.precision} on {self.device}: "
                                     f"{reasons}")
        log.info("%s", self.describe())

    # -- information ----------------------------------------------------------------------------------------
    @property
    def backend_name(self) -> str:
        return self.backend.name

    @property
    def model_name(self) -> str:
        return getattr(self.model, "model_name", type(self.model).__name__)

    @property
    def fell_back(self) -> bool:
        """True when auto had to pass over a backend that ranks above the one it chose."""
        return any(s["status"] != "chosen" for s in self.selection)

    def describe(self) -> str:
        lines = [f"Engine: {self.model_name} on {self.device}, {self.precision}, batch {self.batch_size}, "
                 f"tile {self.tile_size}",
                 f"backend: {self.backend.description}"]
        for s in self.selection:
            mark = {"chosen": "chosen", "unavailable": "skipped", "failed": "FELL BACK from"}[s["status"]]
            lines.append(f"  {mark} {s['backend']}: {s['reason']}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"<Engine {self.model_name} {self.backend.description}>"

    def _verify(self, candidate) -> str | None:
        """None if the candidate matches the fp32 torch reference on a random batch, else what went wrong."""
        g = torch.Generator().manual_seed(1234)
        n = min(2, self.batch_size)
        x = torch.randint(0, 256, (n, self.tile_size, self.tile_size, 3), dtype=torch.uint8, generator=g)
        from ..models.preprocess import to_model_input

        ref_model = self.model if self.device.type == "cpu" else reference_copy(self.model).to(self.device)
        with torch.inference_mode():
            ref = ref_model(to_model_input(x.to(self.device), self.model.mean, self.model.std))
            out = candidate.forward(x.to(self.device))
        err = relative_error(out, ref)
        tol = TOLERANCE[candidate.precision]
        if not err <= tol:
            return (f"output differs from the fp32 torch reference: relative error {err:.2e} > {tol:.0e} "
                    f"({candidate.precision}) on a random {n}-tile batch")
        return None

    # -- running --------------------------------------------------------------------------------------------
    def predict(self, batch, output: str = "logits"):
        """uint8 N x H x W x 3 pixels or float N x 3 x H x W (0..1) -> logits / probabilities N x C x H x W
        float32, or labels N x H x W uint8.

        numpy in -> numpy out; a torch tensor in -> a torch tensor out on the input's device.
        """
        if output not in OUTPUTS:
            raise ConfigError(f"output={output!r}: use one of {', '.join(OUTPUTS)}")
        as_numpy = isinstance(batch, np.ndarray)
        if as_numpy:
            x = torch.from_numpy(np.ascontiguousarray(batch))
        elif isinstance(batch, torch.Tensor):
            x = batch
        else:
            raise ConfigError(f"batch of type {type(batch).__name__}: pass a numpy array or a torch tensor")
        check_batch(x)
        out_device = torch.device("cpu") if as_numpy else x.device
        pin = self.device.type == "cuda" and x.device.type == "cpu"
        parts = []
        for start in range(0, x.shape[0], self.batch_size):
            chunk = x[start:start + self.batch_size]
            if pin:
                chunk = chunk.pin_memory()
            chunk = chunk.to(self.device, non_blocking=pin)
            with torch.inference_mode():
                y = postprocess(self.backend.forward(chunk), output)
            parts.append(y.to(out_device))
        result = parts[0] if len(parts) == 1 else torch.cat(parts)
        return result.numpy() if as_numpy else result

    def __call__(self, batch, output: str = "logits"):
        return self.predict(batch, output=output)

    def stream(self, width: int, height: int, *, overlap: int | None = None, downsample: int = 1,
               batch_size: int | None = None):
        """A `TileStream` over a width x height (level-0 pixels) area, tiles of this engine's tile size."""
        from .streaming import TileStream

        if overlap is None:
            overlap = int(self.tile_config.get("overlap", 0))
        return TileStream(lambda tiles: self.predict(tiles, output="probabilities"), width=width, height=height,
                          tile_size=self.tile_size, overlap=overlap, downsample=downsample,
                          batch_size=batch_size or self.batch_size, num_classes=self.num_classes)

    def segment_slide(self, path, out_dir, **kwargs):
        """Segment a whole slide through `fastgicn.pipeline.segment_slide` with this engine's backend.

        The pipeline takes, as its `model`, any object with `forward(uint8 batch on the device) -> logits`:
        that is this engine's backend, so reading, tiling, stitching and writing are the pipeline's and the
        forward pass is this engine's. `kwargs` go to the pipeline (truth=, stitch=, threads=, progress=, ...);
        `config` defaults to the checkpoint's tile config, else TileConfig(tile_size, batch_size) of this engine.
        Returns the pipeline's SlideResult (its `report` holds seconds per stage).
        """
        from ..config import TileConfig
        from ..pipeline import segment_slide

        config = kwargs.pop("config", None)
        if config is None:
            fields = {k: v for k, v in self.tile_config.items() if k != "batch_size"}
            fields.update(tile_size=self.tile_size, batch_size=self.batch_size)
            config = TileConfig.from_dict(fields)
        if config.batch_size > self.batch_size:
            raise ConfigError(f"config.batch_size={config.batch_size} exceeds this engine's batch_size="
                              f"{self.batch_size}: build the Engine with batch_size={config.batch_size}")
        kwargs.setdefault("model_fp", model_fingerprint(self.model))
        for name in ("model_name", "model_kwargs"):  # for the pipeline's report
            if not hasattr(self.backend, name):
                setattr(self.backend, name, getattr(self.model, name, None))
        return segment_slide(path, out_dir, self.backend, config=config, device=self.device, **kwargs)


def default_precisions(device: torch.device) -> list[str]:
    return ["fp16", "bf16"] if device.type == "cuda" else ["fp32"]


__all__ = ["Engine", "BACKENDS", "OUTPUTS", "AUTO_ORDER", "PRECISIONS", "TOLERANCE", "create_backend",
           "backend_class", "backend_option_names", "postprocess", "default_precisions"]
