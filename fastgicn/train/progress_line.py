"""The training progress line: iterations/s, patches/s, loss, lr, the share of time spent waiting for data,
and the ETA, over the iterations since the previous line."""
from __future__ import annotations

import time

from tqdm import tqdm

__all__ = ["TrainProgress"]


class TrainProgress:
    """`step(waited)` after each iteration (`waited`: seconds spent waiting for its batch), `rates()` for the
    figures since the previous call, `line(...)` for them as one line of text."""

    def __init__(self, start: int, end: int, patches_per_iteration: int, clock=time.perf_counter):
        self.end, self.patches_per_iteration, self.clock = end, patches_per_iteration, clock
        self.iteration = start
        self._mark_time, self._mark_iteration, self._waited = clock(), start, 0.0

    def step(self, waited: float) -> None:
        self.iteration += 1
        self._waited += waited

    def rates(self) -> dict:
        now = self.clock()
        seconds, done = now - self._mark_time, self.iteration - self._mark_iteration
        per_second = done / seconds if seconds > 0 else 0.0
        rates = {"iterations_per_s": per_second, "patches_per_s": per_second * self.patches_per_iteration,
                 "data_wait": self._waited / seconds if seconds > 0 else 0.0,
                 "eta_s": (self.end - self.iteration) / per_second if per_second > 0 else None}
        self._mark_time, self._mark_iteration, self._waited = now, self.iteration, 0.0
        return rates

    def line(self, loss: float, lr: float, rates: dict) -> str:
        eta = "?" if rates["eta_s"] is None else tqdm.format_interval(rates["eta_s"])
        width = len(str(self.end))
        return (f"iter {self.iteration:>{width}}/{self.end}  loss {loss:.4f}  lr {lr:.2e}  "
                f"{rates['iterations_per_s']:.2f} it/s  {rates['patches_per_s']:.1f} patches/s  "
                f"data {100 * rates['data_wait']:.0f}%  ETA {eta}")
