"""One cheap registered model for the command-line tests (in-process and in subprocesses).

`OneConv`: a single 3x3 convolution to two classes, normalised like a checkpoint (mean 0.5, std 0.25), so a
command runs in a second. Two environment variables slow it down for tests that interrupt a run:
FASTGICN_TEST_SLOW=S sleeps S seconds per batch; FASTGICN_TEST_STARTED=FILE touches FILE at each batch and
sleeps 0.25 s. `register(name)` registers it under `name` once; a subprocess script imports this module
(tests/ on PYTHONPATH) and calls `main_with_checkpoint`.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from torch import nn

from fastgicn.config import TileConfig
from fastgicn.models import create_model, register_model
from fastgicn.models.registry import list_models


class OneConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 3, padding=1)
        self.head = self.conv
        self.mean, self.std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)

    def forward(self, x):
        started = os.environ.get("FASTGICN_TEST_STARTED")
        if started:
            Path(started).touch()
            time.sleep(0.25)
        slow = os.environ.get("FASTGICN_TEST_SLOW")
        if slow:
            time.sleep(float(slow))
        return self.conv(x)


def register(name: str) -> str:
    """Register OneConv as model `name` (once per process) and return the name."""
    if name not in list_models():
        def factory() -> nn.Module:
            return OneConv()

        factory.__name__ = name
        register_model(factory)
    return name


def save_tiny_checkpoint(path, name: str, tile_config: TileConfig):
    from fastgicn.train import save_checkpoint

    save_checkpoint(path, create_model(register(name)), tile_config=tile_config)
    return Path(path)


def main_with_checkpoint(name: str, tile_config: TileConfig) -> None:
    """For subprocess scripts: `script.py make CKPT` writes the checkpoint; `script.py ARGS...` runs
    `fastgicn ARGS...` with model `name` registered."""
    register(name)
    if sys.argv[1] == "make":
        save_tiny_checkpoint(sys.argv[2], name, tile_config)
        return
    from fastgicn.cli import main

    sys.exit(main(sys.argv[1:]))
