"""Training precision: fp32 (the reference), bf16 autocast, or fp16 autocast with a gradient scaler.

The loss is always computed in fp32 from the logits; the optimiser keeps fp32 weights. The fp16 loss scale is
training state: it goes into the checkpoint with the optimiser's, so a resumed fp16 run is exact too.
"""
from __future__ import annotations

import torch

from ..errors import ConfigError

PRECISIONS = ("fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class MixedPrecision:
    def __init__(self, precision: str, device: torch.device):
        if precision not in PRECISIONS:
            raise ConfigError(f"precision {precision!r}: use one of {', '.join(PRECISIONS)}")
        if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ConfigError(f"--precision bf16: {torch.cuda.get_device_name(device)} has no bfloat16; "
                              "use --precision fp16 (with loss scaling) or fp32")
        self.precision, self.device_type = precision, device.type
        self.dtype = _DTYPES.get(precision)
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None

    def autocast(self):
        enabled = self.dtype is not None
        return torch.autocast(self.device_type, dtype=self.dtype or torch.float32, enabled=enabled)

    def step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        """Backward and optimiser step (fp16: scaled, and skipped when a gradient overflowed)."""
        optimizer.zero_grad(set_to_none=True)
        if self.scaler is None:
            loss.backward()
            optimizer.step()
            return
        self.scaler.scale(loss).backward()
        self.scaler.step(optimizer)
        self.scaler.update()

    def state_dict(self) -> dict | None:
        return None if self.scaler is None else self.scaler.state_dict()

    def load_state_dict(self, state: dict | None) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)
