"""The stitch thread: stitching and output streaming off the main thread, so the device runner never waits on
them (a bounded queue gives back-pressure)."""
from __future__ import annotations

import queue
import threading
import time

import numpy as np

from .stitch import Stitcher

__all__ = ["StitchThread"]


class StitchThread:
    """Stitching and output streaming on their own thread, fed by a bounded queue, so the main thread goes
    back to the device runner at once. `put(indices, rejected, probs)` blocks while `maxsize` batches wait
    (back-pressure on the runner); an exception in the thread is raised by the next `put` or by `close`, and
    `close` / `abort` always join it. `probs` must stay valid until the thread has stitched it: the runner is
    built with `hold = maxsize + 2` (queued, one being stitched, one being handed over)."""

    def __init__(self, stitcher: Stitcher, maxsize: int = 2):
        self.stitcher = stitcher
        self.maxsize = int(maxsize)
        self.seconds = 0.0
        self.tiles = 0
        self._queue: queue.Queue = queue.Queue(maxsize=self.maxsize)
        self._error: BaseException | None = None
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="fastgicn-stitch", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        add_batch = getattr(self.stitcher, "add_batch", None)
        while True:
            job = self._queue.get()
            if job is None:
                return
            if self._error is not None or self._stop:
                continue  # drain: the producer learns of the error at its next put
            indices, rejected, probs = job
            t0 = time.perf_counter()
            try:
                for i in rejected.tolist():
                    self.stitcher.skip(int(i))
                if len(indices):
                    if add_batch is not None:
                        add_batch(indices, probs)
                    else:
                        for j, i in enumerate(indices.tolist()):
                            self.stitcher.add(int(i), probs[j])
            except BaseException as exc:  # handed to the main thread
                self._error = exc
            self.seconds += time.perf_counter() - t0

    def put(self, indices: np.ndarray, rejected: np.ndarray, probs) -> None:
        while True:
            if self._error is not None:
                raise self._error
            try:
                self._queue.put((indices, rejected, probs), timeout=0.1)
                return
            except queue.Full:
                continue

    def close(self) -> None:
        """Stitch what is queued, stop the thread, raise its error if it had one."""
        self._queue.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error

    def abort(self) -> None:
        """Stop without stitching what is queued (on an error elsewhere); idempotent."""
        if not self._thread.is_alive():
            return
        self._stop = True
        self._queue.put(None)
        self._thread.join()
