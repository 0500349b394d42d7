"""The cluster progress bar on stderr (tqdm): slides done / failed / running, aggregate tiles/s, ETA.

On a terminal a tqdm bar redrawn in place, as `fastgicn.progress.Progress` does for one slide; otherwise one
plain line of the same look every `interval` seconds when asked for (`enabled=True`); silent when disabled.
"""
from __future__ import annotations

import sys
import time

from tqdm import tqdm

__all__ = ["ClusterProgress"]

_FORMAT = "{desc} {percentage:5.1f}%|{bar:24}| {n_fmt}/{total_fmt} slides ETA {remaining}{postfix}"


class ClusterProgress:
    """`update(finished, done, failed, running, tiles)` as the counts change, `close()` at the end."""

    def __init__(self, total: int, label: str = "cluster", enabled: bool | None = None, stream=None,
                 interval: float = 10.0):
        self.stream = stream or sys.stderr
        self.tty = bool(hasattr(self.stream, "isatty") and self.stream.isatty())
        self.enabled = self.tty if enabled is None else bool(enabled)
        self.total, self.label, self.interval = int(total), label, interval
        self.t0 = time.perf_counter()
        self.finished, self.postfix, self._last = 0, "", 0.0
        self._bar = None
        if self.enabled and self.tty:
            self._bar = tqdm(total=self.total, desc=label, file=self.stream, mininterval=0.5,
                             bar_format=_FORMAT, leave=True)

    def line(self) -> str:
        """The bar as one line of text, as it stands now."""
        return tqdm.format_meter(self.finished, self.total, time.perf_counter() - self.t0, prefix=self.label,
                                 ascii=True, bar_format=_FORMAT, postfix=self.postfix)

    def update(self, finished: int, done: int, failed: int, running: int, tiles: int) -> None:
        """`finished` slides of `total` (done, skipped or failed); `tiles` segmented so far by all workers."""
        rate = tiles / max(time.perf_counter() - self.t0, 1e-9)
        self.postfix = f"done {done}, failed {failed}, running {running}, {rate:.1f} tiles/s"
        step, self.finished = finished - self.finished, finished
        if self._bar is not None:
            self._bar.set_postfix_str(self.postfix, refresh=False)
            self._bar.update(step)
        elif self.enabled and time.perf_counter() - self._last >= self.interval:
            self._last = time.perf_counter()
            self.stream.write(self.line() + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.enabled:
            self.stream.write(self.line() + "\n")
            self.stream.flush()
