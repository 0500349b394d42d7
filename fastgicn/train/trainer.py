"""The reference trainer: SGD (momentum 0.9, weight decay 1e-4), the paper's loss and schedules, checkpoints
that resume exactly (each batch and its augmentation are a pure function of the seed and the iteration)."""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..config import TileConfig
from ..errors import ConfigError
from ..models import GicnLoss, create_model
from ..models.preprocess import to_model_input
from ..checkpoint import load_checkpoint, save_checkpoint
from .dataset import PatchDataset, augment
from .schedules import make_schedule


@dataclass
class TrainConfig:
    model: str = "resnet50_gicn_gpp"
    model_kwargs: dict = field(default_factory=dict)
    iterations: int = 1000
    batch_size: int = 8
    schedule: str = "camelyon16"
    lr: float | None = None
    momentum: float = 0.9
    weight_decay: float = 1e-4
    loss_alpha: float = 0.5
    loss_k: float = 5e-4
    seed: int = 0
    augment: bool = True
    eval_every: int = 0
    log_every: int = 50
    checkpoint_every: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.iterations < 1 or self.batch_size < 1:
            raise ConfigError(f"iterations={self.iterations}, batch_size={self.batch_size}: use positive values")
        make_schedule(self.schedule, self.lr)  # validates name and lr
        from ..engine.base import resolve_device

        resolve_device(self.device)  # 'gpu', 'mps', cuda without a GPU: one line now, not a torch traceback later


def batch_generator(seed: int, iteration: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + iteration)


@torch.no_grad()
def evaluate_dice(model: torch.nn.Module, dataset: PatchDataset, batch_size: int = 8,
                  device: str = "cpu") -> dict:
    """Dice over all pixels of all patches of `dataset` (one pooled count, so empty patches are fine)."""
    was_training = model.training
    model.eval()
    inter = pred_sum = truth_sum = 0
    for start in range(0, len(dataset), batch_size):
        images, labels = dataset.batch(range(start, min(start + batch_size, len(dataset))))
        x = to_model_input(images.to(device), model.mean, model.std)
        pred = model(x).argmax(1).cpu() == 1
        truth = labels == 1
        inter += int((pred & truth).sum())
        pred_sum += int(pred.sum())
        truth_sum += int(truth.sum())
    model.train(was_training)
    total = pred_sum + truth_sum
    return {"dice": 1.0 if total == 0 else 2 * inter / total, "patches": len(dataset)}


class Trainer:
    def __init__(self, config: TrainConfig, train_set: PatchDataset, val_set: PatchDataset | None = None,
                 tile_config: TileConfig | None = None, out_dir=None,
                 log: Callable[[str], None] = print):
        self.config, self.train_set, self.val_set = config, train_set, val_set
        self.tile_config = tile_config or TileConfig(tile_size=train_set.size)
        self.out_dir = Path(out_dir) if out_dir else None
        self.log = log
        torch.manual_seed(config.seed)
        self.model = create_model(config.model, **config.model_kwargs).to(config.device)
        self.loss_fn = GicnLoss(alpha=config.loss_alpha, k=config.loss_k)
        self.schedule = make_schedule(config.schedule, config.lr)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=self.schedule(0), momentum=config.momentum,
                                         weight_decay=config.weight_decay)
        self.iteration = 0
        self.metrics: list[dict] = []

    def resume(self, checkpoint_path) -> None:
        payload = load_checkpoint(checkpoint_path)
        if payload["model_name"] != self.config.model or payload["model_kwargs"] != self.config.model_kwargs:
            raise ConfigError(f"checkpoint {checkpoint_path} holds {payload['model_name']}"
                              f"({payload['model_kwargs']}), not {self.config.model}({self.config.model_kwargs})")
        if payload["optimizer"] is None:
            raise ConfigError(f"checkpoint {checkpoint_path} has no optimizer state (demo weights?): "
                              "resume from a checkpoint written during training")
        self.model.load_state_dict(payload["state_dict"])
        self.optimizer.load_state_dict(payload["optimizer"])
        self.iteration, self.metrics = payload["iteration"], list(payload["metrics"])

    def train_step(self) -> dict:
        cfg = self.config
        generator = batch_generator(cfg.seed, self.iteration)
        indices = self.train_set.sample_indices(cfg.batch_size, generator)
        images, labels = self.train_set.batch(indices)
        x = images.permute(0, 3, 1, 2).float() / 255.0
        if cfg.augment:
            x, labels = augment(x, labels, generator)
        x = to_model_input(x.to(cfg.device), self.model.mean, self.model.std)
        lr = self.schedule(self.iteration)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        loss = self.loss_fn(self.model(x), labels.to(cfg.device))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.iteration += 1
        return {"iteration": self.iteration, "loss": float(loss.detach()), "lr": lr, **self.loss_fn.last_terms}

    def fit(self, iterations: int | None = None) -> list[dict]:
        """Train up to `iterations` (default config.iterations) in total, counting resumed ones."""
        cfg = self.config
        end = iterations if iterations is not None else cfg.iterations
        started, losses = time.perf_counter(), []
        while self.iteration < end:
            step = self.train_step()
            losses.append(step["loss"])
            if cfg.log_every and self.iteration % cfg.log_every == 0:
                self.log(f"iter {self.iteration:>6}/{end}  loss {np.mean(losses[-cfg.log_every:]):.4f}  "
                         f"lr {step['lr']:.2e}  {time.perf_counter() - started:.0f}s")
            evaluate = cfg.eval_every and self.iteration % cfg.eval_every == 0
            if (evaluate or self.iteration == end) and self.val_set is not None:
                record = {"iteration": self.iteration, "train_loss": float(np.mean(losses[-50:])),
                          "seconds": time.perf_counter() - started,
                          **evaluate_dice(self.model, self.val_set, cfg.batch_size, cfg.device)}
                self.metrics.append(record)
                self.log(f"iter {self.iteration:>6}  validation Dice {record['dice']:.4f}")
            if self.out_dir and cfg.checkpoint_every and self.iteration % cfg.checkpoint_every == 0:
                self.save(self.out_dir / "last.pt")
        if self.out_dir:
            self.save(self.out_dir / "last.pt")
        return self.metrics

    def save(self, path, notes: str = "", half: bool = False):
        return save_checkpoint(path, self.model, tile_config=self.tile_config, optimizer=self.optimizer,
                               iteration=self.iteration, train_config=dataclasses.asdict(self.config),
                               metrics=self.metrics, notes=notes, half=half)
