"""The reference backend: the model in eager PyTorch. Every other backend is checked against it.

fp32 anywhere; fp16 and bf16 on a CUDA GPU (weights converted, cuDNN picks the kernels); bf16 also on CPU
(slow without AMX, but it lets the bf16 paths be compared on a CPU-only machine). fp16 on CPU is refused:
PyTorch's CPU fp16 convolutions are a slow fallback, never what a user wants.

`forward(x) = infer(preprocess(x))`: the device runner calls the two halves itself to time them apart.
Normalisation constants live on the device (`Normalize`, made once); on CPU in fp32 the normalised input is
written by one table pass into a buffer reused from batch to batch (a model that returned a view of its
input would see it overwritten: the output is copied in that case).
`TorchBackend.wrap(module, device)` serves a plain module (from `create_model`, or any module with
`mean`/`std`) as it is: fp32 eager, no copy, moved to `device` and put in eval mode, as the pipeline always has.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import BackendUnavailable, ConfigError
from ..models.preprocess import Normalize
from .base import Backend, reference_copy


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, model: nn.Module, *, precision: str = "fp32", device="cpu", batch_size: int = 8):
        super().__init__(model, precision=precision, device=device, batch_size=batch_size)
        if self.device.type == "cpu" and precision == "fp16":
            raise BackendUnavailable("torch backend: fp16 on CPU is not supported (PyTorch's CPU fp16 "
                                     "convolutions are a slow fallback); use precision='fp32' or 'bf16' on CPU, "
                                     "or run on a CUDA GPU")
        self.model = reference_copy(model).to(self.device, self.dtype).eval()
        self.norm = Normalize(self.mean, self.std)
        self._scratch = None
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
            self.notes.append("eager, cuDNN autotuned (cudnn.benchmark)")
        else:
            self.notes.append("eager")

    @classmethod
    def wrap(cls, module: nn.Module, device, batch_size: int = 8) -> TorchBackend:
        """The torch backend around `module` itself (fp32, eager; see the module docstring)."""
        for attr in ("mean", "std"):
            if not hasattr(module, attr):
                raise ConfigError(f"model {type(module).__name__} has no .mean/.std normalisation; build it with "
                                  "fastgicn.models.create_model or load it with model_from_checkpoint")
        self = cls.__new__(cls)
        self.precision, self.dtype = "fp32", torch.float32
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        self.model = module.to(self.device).eval()
        self.norm = Normalize(module.mean, module.std)
        self.mean, self.std = self.norm.mean, self.norm.std
        head = getattr(module, "head", None)
        self.num_classes = int(head.out_channels) if hasattr(head, "out_channels") else None
        self.notes = ["eager, the module as given"]
        self._scratch = None
        for name in ("model_name", "model_kwargs"):
            if hasattr(module, name):
                setattr(self, name, getattr(module, name))
        return self

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 NHWC (or float NCHW in 0..1) on the device -> the normalised model input."""
        if self.device.type == "cpu" and x.dtype == torch.uint8 and self.dtype == torch.float32:
            self._scratch = self.norm(x, torch.float32, out=self._scratch)
            return self._scratch
        return self.norm(x, self.dtype)

    def infer(self, inp: torch.Tensor) -> torch.Tensor:
        """The model on a normalised input."""
        with torch.inference_mode():
            out = self.model(inp)
        if inp is self._scratch and isinstance(out, torch.Tensor) and \
                out.untyped_storage().data_ptr() == inp.untyped_storage().data_ptr():
            out = out.clone()  # a view of the reused input buffer: would change with the next batch
        return out

    @torch.inference_mode()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.infer(self.preprocess(x))
