"""Peak resident memory of this process, sampled: ru_maxrss alone cannot say when the peak happened."""
from __future__ import annotations

import threading
import time


def status_kib(field: str) -> int:
    """A `/proc/self/status` field in KiB (VmRSS, VmHWM, ...), or -1 where there is none."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


class RssSampler(threading.Thread):
    """Samples VmRSS every `interval` seconds until `stop()`; `peak_kib` is the largest seen."""

    def __init__(self, interval: float = 0.2):
        super().__init__(daemon=True)
        self.interval, self.peak_kib, self.samples = interval, 0, 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.peak_kib = max(self.peak_kib, status_kib("VmRSS"))
            self.samples += 1
            time.sleep(self.interval)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()
