"""What the benchmark scripts record about the machine, and the one timing loop they share.
(Imported as `from machine import ...`: run the scripts as python bench/NAME.py.)"""
from __future__ import annotations

import statistics
import time


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo ("AMD EPYC ..."), as `python -m fastgicn.bench` records it."""
    from fastgicn.bench.measure import _cpu_name

    return _cpu_name()


def median_seconds(fn, repeats: int) -> float:
    """Median wall time of `repeats` calls of `fn()`."""
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)
