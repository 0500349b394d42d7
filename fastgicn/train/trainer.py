"""The reference trainer: SGD (momentum 0.9, weight decay 1e-4), the paper's loss and schedules, checkpoints
that resume exactly (each batch and its augmentation are a pure function of the seed and the iteration, see
loader.py), in fp32 or mixed precision, with patch loading in worker processes and DDP over torchrun ranks."""
from __future__ import annotations

import dataclasses
import time
from collections import deque
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
from .dataset import PatchDataset
from .distributed import World
from .loader import IterationBatches, batch_generator, batches_of, build_batch, make_loader
from .metrics_log import MetricsLog
from .precision import PRECISIONS, MixedPrecision
from .progress_line import TrainProgress
from .schedules import make_schedule

__all__ = ["TrainConfig", "Trainer", "evaluate_dice", "dice_counts", "batch_generator"]


@dataclass
class TrainConfig:
    model: str = "resnet50_gicn_gpp"
    model_kwargs: dict = field(default_factory=dict)
    iterations: int = 1000
    batch_size: int = 8              # the global batch: split over the ranks under torchrun
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
    precision: str = "fp32"          # fp32 (the reference), bf16 or fp16 autocast
    channels_last: bool | None = None  # None: on with bf16 / fp16
    compile: bool = False            # torch.compile the training step's model
    sync_bn: bool = False            # SyncBatchNorm over the ranks (GPUs only)
    workers: int = 0                 # patch-loading processes (0: the main process)
    prefetch: int = 2                # batches each worker builds ahead

    def __post_init__(self) -> None:
        if self.iterations < 1 or self.batch_size < 1:
            raise ConfigError(f"iterations={self.iterations}, batch_size={self.batch_size}: use positive "
                              "values")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision {self.precision!r}: use one of {', '.join(PRECISIONS)}")
        if self.workers < 0 or self.prefetch < 1:
            raise ConfigError(f"workers={self.workers}, prefetch={self.prefetch}: use workers >= 0 (0 loads "
                              "in the main process) and prefetch >= 1")
        make_schedule(self.schedule, self.lr)  # validates name and lr
        from ..engine.base import resolve_device

        # 'gpu', 'mps', cuda without a GPU: one line now, not a torch traceback later
        resolve_device(self.device)


@torch.no_grad()
def dice_counts(model: torch.nn.Module, dataset: PatchDataset, indices, batch_size: int = 8,
                device="cpu") -> list[int]:
    """[intersection, predicted, truth]: tumour pixel counts over the patches at `indices` (fp32, eval
    mode)."""
    was_training = model.training
    model.eval()
    indices, counts = list(indices), [0, 0, 0]
    for start in range(0, len(indices), batch_size):
        images, labels = dataset.batch(indices[start:start + batch_size])
        x = to_model_input(images.to(device), model.mean, model.std)
        pred = model(x).argmax(1).cpu() == 1
        truth = labels == 1
        for i, count in enumerate(((pred & truth).sum(), pred.sum(), truth.sum())):
            counts[i] += int(count)
    model.train(was_training)
    return counts


def dice_from_counts(counts: list[int], patches: int) -> dict:
    inter, pred_sum, truth_sum = counts
    total = pred_sum + truth_sum
    return {"dice": 1.0 if total == 0 else 2 * inter / total, "patches": patches}


def evaluate_dice(model: torch.nn.Module, dataset: PatchDataset, batch_size: int = 8,
                  device: str = "cpu") -> dict:
    """Dice over all pixels of all patches of `dataset` (one pooled count, so empty patches are fine)."""
    counts = dice_counts(model, dataset, range(len(dataset)), batch_size, device)
    return dice_from_counts(counts, len(dataset))


class _StepState:
    """The optimiser's state as the checkpoint stores it, with the fp16 loss scale beside it
    ("grad_scaler")."""

    def __init__(self, optimizer: torch.optim.Optimizer, precision: MixedPrecision):
        self.optimizer, self.precision = optimizer, precision

    def state_dict(self) -> dict:
        state, scaler = self.optimizer.state_dict(), self.precision.state_dict()
        return state if scaler is None else {**state, "grad_scaler": scaler}


class Trainer:
    """`world` (distributed.py) is this process's rank; by default one process on `config.device`."""

    def __init__(self, config: TrainConfig, train_set: PatchDataset, val_set: PatchDataset | None = None,
                 tile_config: TileConfig | None = None, out_dir=None,
                 log: Callable[[str], None] = print, world: World | None = None):
        from ..engine.base import resolve_device

        self.config, self.train_set, self.val_set = config, train_set, val_set
        self.tile_config = tile_config or TileConfig(tile_size=train_set.size)
        self.out_dir = Path(out_dir) if out_dir else None
        self.log = log
        self.world = world or World(device=config.device)
        self.device = resolve_device(self.world.device if world is not None else config.device)
        self.share = self.world.share(config.batch_size)
        if config.sync_bn and self.world.size > 1 and self.device.type == "cpu":
            raise ConfigError("--sync-bn: torch's SyncBatchNorm runs on GPUs only; drop it for CPU processes "
                              "(each rank then normalises its own share of the batch)")
        self.precision = MixedPrecision(config.precision, self.device)
        self.channels_last = (config.precision != "fp32" if config.channels_last is None
                              else config.channels_last)
        torch.manual_seed(config.seed)
        model = create_model(config.model, **config.model_kwargs).to(self.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if config.sync_bn and self.world.size > 1:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.model = model  # what checkpoints hold and validation runs
        self.loss_fn = GicnLoss(alpha=config.loss_alpha, k=config.loss_k)
        self.schedule = make_schedule(config.schedule, config.lr)
        self.optimizer = torch.optim.SGD(model.parameters(), lr=self.schedule(0), momentum=config.momentum,
                                         weight_decay=config.weight_decay)
        self.step_model = model  # what the training step calls: DDP and / or compiled around `model`
        if self.world.size > 1:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.step_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
        if config.compile:
            self.step_model = torch.compile(self.step_model)
        self.iteration = 0
        self.metrics: list[dict] = []
        self._recent: deque = deque(maxlen=max(50, config.log_every))  # (loss, ce, loc) of this rank's steps

    def resume(self, checkpoint_path) -> None:
        payload = load_checkpoint(checkpoint_path)
        if payload["model_name"] != self.config.model or payload["model_kwargs"] != self.config.model_kwargs:
            raise ConfigError(f"checkpoint {checkpoint_path} holds {payload['model_name']}"
                              f"({payload['model_kwargs']}), not "
                              f"{self.config.model}({self.config.model_kwargs})")
        if payload["optimizer"] is None:
            raise ConfigError(f"checkpoint {checkpoint_path} has no optimizer state (demo weights?): "
                              "resume from a checkpoint written during training")
        optimizer_state = dict(payload["optimizer"])
        scaler_state = optimizer_state.pop("grad_scaler", None)
        self.model.load_state_dict(payload["state_dict"])
        self.optimizer.load_state_dict(optimizer_state)
        self.precision.load_state_dict(scaler_state)
        self.iteration, self.metrics = payload["iteration"], list(payload["metrics"])

    def train_step(self) -> dict:
        """One iteration, its batch built here (fit() takes them from the loader instead)."""
        cfg = self.config
        images, labels = build_batch(self.train_set, cfg.seed, self.iteration, cfg.batch_size, self.share,
                                     cfg.augment)
        return self._step(images, labels)

    def _step(self, images: torch.Tensor, labels: torch.Tensor) -> dict:
        x = to_model_input(images.to(self.device, non_blocking=True), self.model.mean, self.model.std)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        lr = self.schedule(self.iteration)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.step_model.train()
        with self.precision.autocast():
            logits = self.step_model(x)
        loss = self.loss_fn(logits.float(), labels.to(self.device, non_blocking=True))
        self.precision.step(loss, self.optimizer)
        self.iteration += 1
        step = {"iteration": self.iteration, "loss": float(loss.detach()), "lr": lr,
                **self.loss_fn.last_terms}
        self._recent.append((step["loss"], step["ce"], step["loc"]))
        return step

    def fit(self, iterations: int | None = None) -> list[dict]:
        """Train up to `iterations` (default config.iterations) in total, counting resumed ones."""
        end = iterations if iterations is not None else self.config.iterations
        if self.iteration < end:
            self._run(end)
        if self.out_dir and self.world.is_main:
            self.save(self.out_dir / "last.pt")
        return self.metrics

    def _run(self, end: int) -> None:
        cfg, main = self.config, self.world.is_main
        batches = IterationBatches(self.train_set, cfg.seed, cfg.batch_size, self.share, cfg.augment)
        loader = make_loader(batches, self.iteration, end, cfg.workers, cfg.prefetch,
                             pin_memory=self.device.type == "cuda")
        progress = TrainProgress(self.iteration, end, cfg.batch_size)
        metrics_log = MetricsLog(self.out_dir) if self.out_dir and main else None
        started = time.perf_counter()
        stream = batches_of(loader)
        try:
            while self.iteration < end:
                waiting = time.perf_counter()
                images, labels = next(stream)
                waited = time.perf_counter() - waiting
                step = self._step(images, labels)
                progress.step(waited)
                if cfg.log_every and self.iteration % cfg.log_every == 0:
                    self._log_progress(progress, step["lr"], metrics_log, time.perf_counter() - started)
                evaluate = cfg.eval_every and self.iteration % cfg.eval_every == 0
                if (evaluate or self.iteration == end) and self.val_set is not None:
                    self._validate(metrics_log, time.perf_counter() - started)
                checkpoint = cfg.checkpoint_every and self.iteration % cfg.checkpoint_every == 0
                if self.out_dir and main and checkpoint:
                    self.save(self.out_dir / "last.pt")
        finally:
            stream.close()  # stops the worker processes
            if metrics_log is not None:
                metrics_log.close()

    def _log_progress(self, progress: TrainProgress, lr: float, metrics_log, seconds: float) -> None:
        window = np.array(list(self._recent)[-self.config.log_every:])
        loss, ce, loc = self.world.mean([float(v) for v in window.mean(0)])
        rates = progress.rates()
        if not self.world.is_main:
            return
        self.log(progress.line(loss, lr, rates))
        if metrics_log is not None:
            metrics_log.write({"kind": "train", "iteration": self.iteration, "loss": loss, "ce": ce,
                               "loc": loc, "lr": lr, "iterations_per_s": rates["iterations_per_s"],
                               "patches_per_s": rates["patches_per_s"], "data_wait": rates["data_wait"],
                               "seconds": seconds})

    def _validate(self, metrics_log, seconds: float) -> None:
        """Dice on the held-out patches, each rank counting every size-th one."""
        cfg, world = self.config, self.world
        mine = range(world.rank, len(self.val_set), world.size)
        counts = world.sum(dice_counts(self.model, self.val_set, mine, cfg.batch_size, self.device))
        recent = [r[0] for r in list(self._recent)[-50:]]
        train_loss = world.mean([float(np.mean(recent))])[0]
        record = {"iteration": self.iteration, "train_loss": train_loss, "seconds": seconds,
                  **dice_from_counts(counts, len(self.val_set))}
        self.metrics.append(record)
        if world.is_main:
            self.log(f"iter {self.iteration:>6}  validation Dice {record['dice']:.4f}")
            if metrics_log is not None:
                metrics_log.write({"kind": "val", "iteration": self.iteration, "loss": train_loss,
                                   "dice": record["dice"], "patches": record["patches"], "seconds": seconds})

    def save(self, path, notes: str = "", half: bool = False):
        return save_checkpoint(path, self.model, tile_config=self.tile_config,
                               optimizer=_StepState(self.optimizer, self.precision), iteration=self.iteration,
                               train_config=dataclasses.asdict(self.config), metrics=self.metrics,
                               notes=notes, half=half)
