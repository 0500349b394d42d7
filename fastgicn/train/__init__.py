"""Patch datasets from slides and masks, the reference trainer, and checkpoints."""
from ..checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from .dataset import ArraySource, PatchDataset, SlideSource, SyntheticSource, augment, is_glass
from .schedules import LrSchedule, make_schedule
from .trainer import Trainer, TrainConfig, evaluate_dice

__all__ = ["load_checkpoint", "model_from_checkpoint", "save_checkpoint", "ArraySource", "PatchDataset", "SlideSource",
           "SyntheticSource", "augment", "is_glass", "LrSchedule", "make_schedule", "Trainer", "TrainConfig",
           "evaluate_dice"]
