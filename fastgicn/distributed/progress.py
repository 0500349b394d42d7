"""The cluster progress bar on stderr (tqdm): slides done / failed / running, aggregate tiles/s, ETA.

On a terminal a tqdm bar redrawn in place, as `fastgicn.progress.Progress` does for one slide; otherwise one
plain line of the same look every `interval` seconds when asked for (`enabled=True`); silent when disabled.
"""
from __future__ import annotations

import time

from ..progress import Progress

__all__ = ["ClusterProgress"]

_FORMAT = "{desc} {percentage:5.1f}%|{bar:24}| {n_fmt}/{total_fmt} slides ETA {remaining}{postfix}"


class ClusterProgress(Progress):
    """`update(finished, done, failed, running, tiles)` as the counts change, `close()` at the end."""

    bar_format, unit, mininterval = _FORMAT, " slides", 0.5

    def __init__(self, total: int, label: str = "cluster", enabled: bool | None = None, stream=None,
                 interval: float = 10.0):
        super().__init__(total, label, enabled, stream, interval)

    @property
    def finished(self) -> int:
        return self.done

    def update(self, finished: int, done: int, failed: int, running: int, tiles: int) -> None:
        """`finished` slides of `total` (done, skipped or failed); `tiles` segmented so far by all workers."""
        rate = tiles / max(time.perf_counter() - self.t0, 1e-9)
        self.postfix = f"done {done}, failed {failed}, running {running}, {rate:.1f} tiles/s"
        super().update(finished - self.done)
