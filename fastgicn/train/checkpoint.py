"""Checkpoints: model name, kwargs, normalisation, tile config, training state and metrics in one file.

Written to a temporary name and renamed, so a killed run never leaves a truncated checkpoint behind.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from ..config import TileConfig
from ..errors import ConfigError
from ..models import create_model

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
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise ConfigError(f"could not write checkpoint {path}: {exc.strerror or exc}; "
                          "free disk space or choose another output directory") from exc
    return path


def load_checkpoint(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"checkpoint {path} does not exist: pass the .pt file written by `fastgicn train`")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # torch raises many types for a truncated or foreign file
        raise ConfigError(f"checkpoint {path} is unreadable ({type(exc).__name__}: {exc}); "
                          "it may be truncated: re-download or re-train it") from exc
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
