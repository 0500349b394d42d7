"""The progress bar on stderr (tqdm): tiles done, tiles/s, ETA.

On a terminal a tqdm bar redrawn in place; otherwise (a log file, a pipe) one plain line of the same look every
`interval` seconds when asked for (`enabled=True`); `enabled=False`, or None off a terminal, is silent.
"""
from __future__ import annotations

import sys
import time

from tqdm import tqdm

__all__ = ["Progress"]

_FORMAT = "{desc} {percentage:5.1f}%|{bar:24}| {n_fmt}/{total_fmt} tiles {rate_fmt} ETA {remaining}"
_UNIT = " tiles"


class Progress:
    """`update(n)` after each batch, `close()` at the end (prints the final line). Subclasses change what is
    counted through `bar_format`, `unit` and `postfix` (see `fastgicn.distributed.progress`)."""

    bar_format, unit, mininterval = _FORMAT, _UNIT, 0.2

    def __init__(self, total: int, label: str, enabled: bool | None = None, stream=None, interval: float = 10.0):
        self.stream = stream or sys.stderr
        self.tty = bool(hasattr(self.stream, "isatty") and self.stream.isatty())
        self.enabled = self.tty if enabled is None else bool(enabled)
        self.total, self.label, self.done = int(total), label, 0
        self.interval = interval
        self.postfix = ""
        self.t0 = time.perf_counter()
        self._last = 0.0
        self._bar = None
        if self.enabled and self.tty:
            self._bar = tqdm(total=self.total, desc=label, unit=self.unit, file=self.stream,
                             mininterval=self.mininterval, bar_format=self.bar_format, leave=True)

    def line(self) -> str:
        """The bar as one line of text, as it stands now."""
        return tqdm.format_meter(self.done, self.total, time.perf_counter() - self.t0, prefix=self.label,
                                 unit=self.unit, ascii=True, bar_format=self.bar_format, postfix=self.postfix)

    def update(self, n: int) -> None:
        self.done += n
        if self._bar is not None:
            if self.postfix:
                self._bar.set_postfix_str(self.postfix, refresh=False)
            self._bar.update(n)
        elif self.enabled:
            now = time.perf_counter()
            if now - self._last >= self.interval:
                self._last = now
                self.stream.write(self.line() + "\n")
                self.stream.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.enabled:
            self.stream.write(self.line() + "\n")
            self.stream.flush()
