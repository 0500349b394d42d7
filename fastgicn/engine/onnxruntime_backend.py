"""ONNX Runtime: the exported graph, on the CPU provider here and the CUDA provider where onnxruntime-gpu is.

Two layers:
- `OnnxSegmenter`: torch-free. numpy uint8 N x H x W x 3 (or float N x 3 x H x W in 0..1) in, numpy logits /
  labels / probabilities out; needs only numpy, onnxruntime and a `.onnx` file written by `fastgicn export`
  (normalisation statistics are read from its metadata). Importing this module does not import torch.
- `OnnxRuntimeBackend`: the engine backend (the shared interface, torch tensors in and out); it exports the
  model once per tile size and, on the CUDA provider, binds torch's device buffers with one IO binding per
  session (rebound per batch) so no tile makes a round trip through host memory. ORT runs on a torch stream
  of the backend's (`compute_stream`, passed as `user_compute_stream`) with the end-of-run synchronisation
  off (`disable_synchronize_execution_providers`): no host sync per batch, ordered by stream events.

Precisions: fp32; fp16 (a 16-bit graph with float32 I/O: fast on the CUDA provider; on CPU it runs, slower than
fp32, and is there to validate the graph TensorRT 11 consumes). bf16 is refused: ONNX Conv has no bfloat16 before
opset 22 and ONNX Runtime rejects such graphs.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import BackendUnavailable, ConfigError

INPUT_NAME = "input"    # kept equal to export.INPUT_NAME / OUTPUT_NAME (export imports torch; this must not)
OUTPUT_NAME = "logits"
META_PREFIX = "fastgicn."
OUTPUTS = ("logits", "labels", "probabilities")


def _require_ort():
    try:
        import onnxruntime
    except ImportError as exc:
        raise BackendUnavailable("the onnxruntime backend needs onnxruntime: pip install 'fastgicn[onnx]' "
                                 "(CPU), or onnxruntime-gpu for the CUDA provider") from exc
    return onnxruntime


def normalize_numpy(batch: np.ndarray, mean, std) -> np.ndarray:
    """numpy twin of fastgicn.models.preprocess.to_model_input (same float32 operations, same order)."""
    batch = np.asarray(batch)
    if batch.dtype == np.uint8:
        if batch.ndim != 4 or batch.shape[-1] != 3:
            raise ConfigError(f"uint8 batch of shape {batch.shape}: expected N x H x W x 3 RGB pixels")
        x = batch.transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255.0)
    elif np.issubdtype(batch.dtype, np.floating):
        if batch.ndim != 4 or batch.shape[1] != 3:
            raise ConfigError(f"float batch of shape {batch.shape}: expected N x 3 x H x W in 0..1")
        x = batch.astype(np.float32)
    else:
        raise ConfigError(f"batch dtype {batch.dtype}: use uint8 N x H x W x 3 or float N x 3 x H x W in 0..1")
    mean = np.asarray(mean, dtype=np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(std, dtype=np.float32).reshape(1, 3, 1, 1)
    return np.ascontiguousarray((x - mean) / std)


def postprocess_numpy(logits: np.ndarray, output: str) -> np.ndarray:
    if output == "logits":
        return logits.astype(np.float32, copy=False)
    if output == "labels":
        return logits.argmax(axis=1).astype(np.uint8)
    if output == "probabilities":
        z = logits.astype(np.float32) - logits.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)
    raise ConfigError(f"output={output!r}: use one of {', '.join(OUTPUTS)}")


class OnnxSegmenter:
    """A torch-free runtime for a graph written by `fastgicn export --format onnx`.

        seg = OnnxSegmenter("model.onnx")
        labels = seg.predict(tiles_uint8_nhwc, output="labels")   # N x H x W uint8
    """

    def __init__(self, model, providers=None, *, session_options=None, threads: int | None = None):
        ort = _require_ort()
        if isinstance(model, (str, Path)):
            path = Path(model)
            if not path.is_file():
                raise ConfigError(f"ONNX model {path} does not exist: write one with `fastgicn export CKPT "
                                  "--format onnx -o FILE`")
            data = path.read_bytes()
        else:
            data = bytes(model)
        options = session_options or ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = int(threads)
        try:
            self.session = ort.InferenceSession(data, options, providers=providers or ["CPUExecutionProvider"])
        except Exception as exc:
            from ..errors import EngineBuildError
            raise EngineBuildError(f"ONNX Runtime could not load the graph ({type(exc).__name__}: "
                                   f"{str(exc).splitlines()[0][:300]})") from exc
        meta = self.session.get_modelmeta().custom_metadata_map
        self.metadata = {k[len(META_PREFIX):]: v for k, v in meta.items() if k.startswith(META_PREFIX)}
        if "mean" not in self.metadata or "std" not in self.metadata:
            raise ConfigError("this ONNX graph carries no fastgicn normalisation metadata: export it with "
                              "`fastgicn export` (or fastgicn.engine.export.export_onnx)")
        import json
        self.mean = tuple(json.loads(self.metadata["mean"]))
        self.std = tuple(json.loads(self.metadata["std"]))
        inp = self.session.get_inputs()[0]
        self.input_name, self.output_name = inp.name, self.session.get_outputs()[0].name
        self.size = (int(inp.shape[2]), int(inp.shape[3]))
        self.providers = self.session.get_providers()

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Logits N x C x H x W float32 for uint8 NHWC pixels or float NCHW in 0..1."""
        x = normalize_numpy(batch, self.mean, self.std)
        if tuple(x.shape[2:]) != self.size:
            raise ConfigError(f"tiles of {x.shape[2]} x {x.shape[3]}: this graph was exported for "
                              f"{self.size[0]} x {self.size[1]}; export another with --size")
        return self.session.run([self.output_name], {self.input_name: x})[0]

    def predict(self, batch: np.ndarray, output: str = "logits") -> np.ndarray:
        if output not in OUTPUTS:
            raise ConfigError(f"output={output!r}: use one of {', '.join(OUTPUTS)}")
        return postprocess_numpy(self.run(batch), output)


class OnnxRuntimeBackend:
    """The engine backend (same interface as fastgicn.engine.base.Backend; torch is imported here only)."""

    name = "onnxruntime"

    def __init__(self, model, *, precision: str = "fp32", device="cpu", batch_size: int = 8, providers=None,
                 threads: int | None = None, opset: int | None = None):
        import torch

        from .base import PRECISIONS, check_batch_size, check_precision, reference_copy
        from .export import DEFAULT_OPSET

        ort = _require_ort()
        self.precision = check_precision(precision)
        self.dtype = PRECISIONS[precision]
        self.device = torch.device(device)
        self.batch_size = check_batch_size(batch_size)
        if precision == "bf16":
            raise BackendUnavailable("onnxruntime backend: bf16 is not supported (ONNX Conv has no bfloat16 "
                                     "before opset 22 and ONNX Runtime rejects the graph); use precision='fp16' "
                                     "or 'fp32', or backend='compiled'/'tensorrt' for bf16")
        available = ort.get_available_providers()
        if self.device.type == "cuda":
            if "CUDAExecutionProvider" not in available:
                raise BackendUnavailable(f"onnxruntime backend on {self.device}: this onnxruntime "
                                         f"({ort.__version__}) has no CUDAExecutionProvider (it has "
                                         f"{', '.join(available)}); pip install onnxruntime-gpu in place of "
                                         "onnxruntime, or use device='cpu'")
            index = self.device.index if self.device.index is not None else torch.cuda.current_device()
            self.device = torch.device("cuda", index)
            # ORT's CUDA kernels run on a torch stream of ours (not the legacy default stream): the device
            # runner computes on it too, and a caller on another stream is ordered against it by events
            self._own_stream = providers is None
            self.compute_stream = torch.cuda.Stream(self.device) if self._own_stream else None
            self._run_options = ort.RunOptions()
            if self._own_stream:
                cuda_options = {"device_id": index, "has_user_compute_stream": "1",
                                "user_compute_stream": str(self.compute_stream.cuda_stream)}
                self.providers = [("CUDAExecutionProvider", cuda_options), "CPUExecutionProvider"]
                # no stream synchronisation at the end of a run: the outputs are ordered by stream events
                self._run_options.add_run_config_entry("disable_synchronize_execution_providers", "1")
            else:  # the caller's providers: ORT picks its stream, so the old host synchronisation stays
                self.providers = providers
        else:
            self.compute_stream = None
            self._own_stream = False
            self._run_options = None
            self.providers = providers or ["CPUExecutionProvider"]
        ref = reference_copy(model).cpu()
        self.mean = tuple(float(v) for v in ref.mean)
        self.std = tuple(float(v) for v in ref.std)
        self.num_classes = int(ref.head.out_channels)
        from ..models.preprocess import Normalize

        self.norm = Normalize(self.mean, self.std)  # constants on the device once; one table pass on CPU
        self._scratch = None
        self._bindings: dict[tuple[int, int], object] = {}  # one IO binding per session, rebound per batch
        self._model = ref
        self.threads = threads
        self.opset = opset or DEFAULT_OPSET
        self._sessions: dict[tuple[int, int], OnnxSegmenter] = {}
        provider_names = [p[0] if isinstance(p, tuple) else p for p in self.providers]
        self.notes = [f"ONNX opset {self.opset}, standard ops only", f"providers {', '.join(provider_names)}",
                      f"onnxruntime {ort.__version__}"]
        if self.device.type == "cuda":
            self.notes.append("IO binding on torch CUDA buffers, on a torch stream (user_compute_stream), no "
                              "synchronisation per run")
        elif precision == "fp16":
            self.notes.append("fp16 graph on CPU: for validating the 16-bit graph, slower than fp32")

    @property
    def description(self) -> str:
        return f"{self.name} ({self.precision}, {self.device})" + "".join(f"; {n}" for n in self.notes)

    def session(self, size: tuple[int, int]) -> OnnxSegmenter:
        seg = self._sessions.get(tuple(size))
        if seg is None:
            from .export import export_onnx

            # trace 16-bit graphs on the GPU when there is one (CPU fp16 convolutions are a slow fallback)
            data = export_onnx(self._model, size=tuple(size), precision=self.precision, opset=self.opset,
                               device=self.device if self.device.type == "cuda" else "cpu")
            seg = OnnxSegmenter(data, self.providers, threads=self.threads)
            self._sessions[tuple(size)] = seg
        return seg

    def prepare(self, size: tuple[int, int]) -> None:
        self.session(size)

    def preprocess(self, x):
        """uint8 NHWC (or float NCHW in 0..1) on the device -> the normalised float32 graph input."""
        import torch

        if self.device.type != "cuda" and x.dtype == torch.uint8:
            self._scratch = self.norm(x, torch.float32, out=self._scratch)  # reused: ORT copies nothing back
            return self._scratch
        return self.norm(x, torch.float32).contiguous()

    def infer(self, inp):
        """Logits for a normalised input (see `preprocess`)."""
        import torch

        h, w = int(inp.shape[2]), int(inp.shape[3])
        seg = self.session((h, w))
        if self.device.type != "cuda":
            out = seg.session.run([seg.output_name], {seg.input_name: inp.numpy()})[0]
            return torch.from_numpy(out)
        inp = inp.contiguous()
        index = self.device.index
        out = torch.empty((inp.shape[0], self.num_classes, h, w), dtype=torch.float32, device=self.device)
        binding = self._bindings.get((h, w))
        if binding is None:
            binding = self._bindings[(h, w)] = seg.session.io_binding()
        binding.bind_input(seg.input_name, "cuda", index, np.float32, tuple(inp.shape), inp.data_ptr())
        binding.bind_output(seg.output_name, "cuda", index, np.float32, tuple(out.shape), out.data_ptr())
        caller = torch.cuda.current_stream(self.device)
        if not self._own_stream:  # ORT on a stream of its choosing: the input must be ready on the host's word
            caller.synchronize()
            seg.session.run_with_iobinding(binding, self._run_options)
            return out
        stream = self.compute_stream
        if caller != stream:  # order ORT's stream after the caller's work, and the caller after ORT's
            stream.wait_stream(caller)
            inp.record_stream(stream)
            out.record_stream(stream)
        seg.session.run_with_iobinding(binding, self._run_options)
        if caller != stream:
            caller.wait_stream(stream)
        return out

    def forward(self, x):
        import torch

        with torch.inference_mode():
            return self.infer(self.preprocess(x))

    def __repr__(self) -> str:
        return f"<OnnxRuntimeBackend {self.description}>"
