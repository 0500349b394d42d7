"""Checkpoints: model name, kwargs, normalisation, tile config, training state and metrics in one file.

Written to a temporary name and renamed, so a killed run never leaves a truncated checkpoint behind.
A checkpoint is data: only tensors and plain containers (dict, list, tuple, str, int, float, bool, None) are
written, and `load_checkpoint` reads with `torch.load(weights_only=True)`, so a file whose pickle would run code
(a `__reduce__` calling `os.system`, a pickled class) is refused before anything in it executes.
"""
from __future__ import annotations

import dataclasses
import os
import pickle
import re
from pathlib import Path

import torch

from .config import TileConfig
from .errors import ConfigError
from .models import create_model

FORMAT = "fastgicn-checkpoint-1"


def save_checkpoint(path, model, *, tile_config: TileConfig, optimizer=None, iteration: int = 0,
                    train_config: dict | None = None, metrics: list | None = None, notes: str = "",
                    half: bool = False) -> Path:
    """Save everything needed to rebuild the model and to resume training exactly.

    `half=True` stores floating weights as fp16 (for the small shipped demo weights); never for resuming.
    """
    path = Path(path)
    state = {k: (v.half() if half and v.is_floating_point() else v).cpu() for k, v in model.state_dict().items()}
    payload = {
        "format": FORMAT,
        "model_name": model.model_name,
        "model_kwargs": dict(model.model_kwargs),
        "normalization": {"mean": list(model.mean), "std": list(model.std)},
        "tile_config": tile_config.to_dict(),
        "train_config": dict(train_config or {}),
        "iteration": int(iteration),
        "metrics": list(metrics or []),
        "notes": notes,
        "state_dict": state,
        "optimizer": None if optimizer is None or half else optimizer.state_dict(),
    }
    payload = _plain(payload, "checkpoint")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise ConfigError(f"could not write checkpoint {path}: {exc.strerror or exc}; "
                          "free disk space or choose another output directory") from exc
    except BaseException:  # Ctrl-C / SIGTERM while saving: no half-written temporary stays behind
        tmp.unlink(missing_ok=True)
        raise
    return path


def _plain(value, where: str):
    """`value` as tensors and plain containers only (what `torch.load(weights_only=True)` accepts): dataclasses
    become dicts, NumPy scalars and arrays Python numbers and tensors, paths strings; anything else is refused."""
    if value is None or isinstance(value, (bool, int, float, str, torch.Tensor, torch.dtype, torch.device)):
        return value
    if isinstance(value, dict):
        return {k if isinstance(k, (str, int)) else str(k): _plain(v, f"{where}[{k!r}]") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        items = [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if isinstance(value, list) else tuple(items)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _plain(dataclasses.asdict(value), where)
    if isinstance(value, os.PathLike):
        return str(value)
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value.copy())
    raise ConfigError(f"{where} is of type {type(value).__name__}: a checkpoint holds only tensors, numbers, "
                      "strings and lists/dicts of them (so it loads as data); convert it before saving")


def load_checkpoint(path) -> dict:
    """Read a checkpoint as data (`torch.load(weights_only=True)`): a file holding anything but tensors and plain
    containers is refused with ConfigError, before any code in it can run."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"checkpoint {path} does not exist: pass the .pt file written by `fastgicn train`")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if found:
            raise ConfigError(f"checkpoint {path} refused: it holds the Python object {found.group(1)}, not only "
                              "tensors and plain data, and loading it could run code; use a checkpoint written "
                              "by `fastgicn train`, or, if you trust its source, re-save its weights as plain "
                              "tensors and dicts") from None
        detail = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(?:\n\n|$)", str(exc), re.S)
        detail = " ".join((detail.group(1) if detail else "not plain data").split())[:200]
        raise ConfigError(f"checkpoint {path} cannot be read as data ({detail}): it is corrupt, truncated or "
                          "not a checkpoint; re-download or re-train it") from None
    except Exception as exc:  # torch raises many types for a truncated or foreign file
        detail = " ".join(str(exc).split(". ")[0].split())[:300]
        raise ConfigError(f"checkpoint {path} is unreadable ({type(exc).__name__}: {detail}); "
                          "it may be truncated: re-download or re-train it") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ConfigError(f"{path} is not a fastgicn checkpoint (expected format {FORMAT!r})")
    return payload


def model_from_checkpoint(path_or_payload, device: str | torch.device = "cpu") -> torch.nn.Module:
    """Rebuild the model a checkpoint describes, load its weights (as fp32), in eval mode."""
    payload = path_or_payload if isinstance(path_or_payload, dict) else load_checkpoint(path_or_payload)
    model = create_model(payload["model_name"], **payload["model_kwargs"])
    state = {k: (v.float() if v.is_floating_point() else v) for k, v in payload["state_dict"].items()}
    model.load_state_dict(state)
    norm = payload["normalization"]
    model.mean, model.std = tuple(norm["mean"]), tuple(norm["std"])
    return model.to(device).eval()


def load_model(weights=None, device="cpu"):
    """(model, checkpoint payload, path) from `weights`, or from the shipped demo weights when None."""
    from .demo import DEMO_WEIGHTS
    from .engine.base import resolve_device

    path = Path(weights) if weights is not None else DEMO_WEIGHTS
    if weights is None and not path.is_file():
        raise ConfigError(f"no --weights given and the demo weights {path} are not installed: pass a checkpoint "
                          "written by `fastgicn train`, or reinstall fastgicn with its weights")
    device = resolve_device(device)  # a bad --device is refused before the checkpoint is read
    payload = load_checkpoint(path)
    return model_from_checkpoint(payload, device), payload, path
