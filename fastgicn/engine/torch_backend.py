"""The reference backend: the model in eager PyTorch. Every other backend is checked against it.

fp32 anywhere; fp16 and bf16 on a CUDA GPU (weights converted, cuDNN picks the kernels); bf16 also on CPU
(slow without AMX, but it lets the bf16 paths be compared on a CPU-only machine). fp16 on CPU is refused:
PyTorch's CPU fp16 convolutions are a slow fallback, never what a user wants.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import BackendUnavailable
from ..models.preprocess import to_model_input
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
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
            self.notes.append("eager, cuDNN autotuned (cudnn.benchmark)")
        else:
            self.notes.append("eager")

    @torch.inference_mode()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(to_model_input(x, self.mean, self.std, self.dtype))
