"""The paper's learning-rate schedules (section 4) as pure functions of the iteration."""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError


@dataclass(frozen=True)
class LrSchedule:
    """lr(it) = base_lr * gamma ** (it // step), then overridden by the last milestone reached, if any."""

    name: str
    base_lr: float
    gamma: float = 1.0
    step: int = 1
    milestones: tuple[tuple[int, float], ...] = ()
    total_iterations: int | None = None

    def __call__(self, iteration: int) -> float:
        lr = self.base_lr * self.gamma ** (iteration // self.step)
        for start, value in self.milestones:
            if iteration >= start:
                lr = value
        return lr


def make_schedule(name: str, lr: float | None = None) -> LrSchedule:
    """`camelyon16`: 5e-4 x 0.98 every 10k iterations. `gastric`: 1e-4, 1e-5 from 380k, 1e-6 from 460k, 500k
    in all. `constant`: `lr` throughout (for short runs of small models). `lr` replaces a paper base rate."""
    if name == "camelyon16":
        return LrSchedule(name, 5e-4 if lr is None else lr, gamma=0.98, step=10_000)
    if name == "gastric":
        base = 1e-4 if lr is None else lr
        return LrSchedule(name, base, milestones=((380_000, base / 10), (460_000, base / 100)),
                          total_iterations=500_000)
    if name == "constant":
        if lr is None:
            raise ConfigError("the constant schedule needs a learning rate: pass --lr (e.g. 0.01)")
        return LrSchedule(name, lr)
    raise ConfigError(f"unknown schedule {name!r}: use camelyon16, gastric or constant")
