"""Triton kernels for fastgicn's hot ops, each checked against its reference module in fastgicn.models.

    from fastgicn.kernels import use_triton, use_reference
    use_triton(model)        # GICN and GPP modules now run the Triton kernels (same parameters, same keys)
    with torch.inference_mode():
        logits = model(x)
    use_reference(model)     # back to the reference modules, e.g. before ONNX export or training

The kernels run on CUDA tensors; with TRITON_INTERPRET=1 set before this package is first imported they run
(about 10,000x slower) on CPU tensors, which is how the tests check them without a GPU. The interpreter does not
compile them: `python -m fastgicn.kernels.compile_report` compiles every kernel for sm_80 / sm_90 on a CPU and
reports shared memory, registers and spills.
"""
from __future__ import annotations

from torch import nn

from fastgicn.models.gicn import GICN
from fastgicn.models.gpp import GPP

from ._common import INTERPRETED
from .gicn import GicnConfig, TritonGICN, gicn_forward
from .gpp import TritonGPP, gpp_forward, gpp_output_buffer

__all__ = ["gicn_forward", "gpp_forward", "gpp_output_buffer", "GicnConfig", "TritonGICN", "TritonGPP",
           "use_triton", "use_reference", "INTERPRETED"]


def _swap(model: nn.Module, convert) -> int:
    """Replace, in place, every child for which convert(child) returns a module; returns how many."""
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            new = convert(child)
            if new is not None:
                setattr(parent, name, new)
                count += 1
    return count


def use_triton(model: nn.Module) -> nn.Module:
    """Swap every reference GICN / GPP inside `model` (or `model` itself, returned) for its Triton module.

    The Triton modules hold the very same parameters, so state_dict keys and values are unchanged and a
    checkpoint loads either way. Returns the model, swapped in place.
    """
    def convert(m):
        if isinstance(m, GICN):
            return TritonGICN(m)
        if isinstance(m, GPP):
            return TritonGPP(m)
        return None
    if convert(model) is not None:
        return convert(model)
    _swap(model, convert)
    return model


def use_reference(model: nn.Module) -> nn.Module:
    """The inverse of `use_triton`: the reference modules back (for training, ONNX export, TorchScript)."""
    def convert(m):
        return m.to_reference() if isinstance(m, (TritonGICN, TritonGPP)) else None
    if convert(model) is not None:
        return convert(model)
    _swap(model, convert)
    return model
