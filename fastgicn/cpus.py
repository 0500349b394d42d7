"""How many CPU cores this process may use: its CPU affinity and its container's CPU quota.

`os.cpu_count()` reports the whole node: under SLURM (`--cpus-per-task`, an affinity mask), Docker
(`--cpus`, a CFS quota) or Kubernetes (a cgroup limit) a process that starts that many threads fights
itself. `usable_cpus()` is the smaller of the affinity mask and the cgroup quota (v2 `cpu.max`, or v1
`cpu.cfs_quota_us` / `cpu.cfs_period_us`, on this process's cgroup and its parents), rounded up.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

__all__ = ["usable_cpus", "cgroup_cpu_limit", "default_reader_threads", "MAX_READER_THREADS"]

# Direct decoding gives ~1,000 tiles/s of 512^2 per thread: 16 threads feed any single GPU, even reading
# level 0 of a 40x slide reduced 2x (4 tiles decoded per tile segmented).
MAX_READER_THREADS = 16


def _cgroup_dirs(root: Path) -> list[Path]:
    """This process's cgroup directories under `root`, innermost first (v2 unified and v1 cpu hierarchies)."""
    dirs = []
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        controllers, rel = parts[1], parts[2].lstrip("/")
        bases = [root] if controllers == "" else [root / c for c in ("cpu", "cpu,cpuacct", "cpuacct,cpu")
                                                    if "cpu" in controllers.split(",")]
        for base in bases:
            d = base / rel
            while True:
                dirs.append(d)
                if d == base:
                    break
                d = d.parent
    return dirs + [root, root / "cpu"]


def cgroup_cpu_limit(root: str | os.PathLike = "/sys/fs/cgroup") -> float | None:
    """The tightest CPU quota (in cores) on this process's cgroups, or None when there is none."""
    limits = []
    for d in _cgroup_dirs(Path(root)):
        try:
            quota, period = (d / "cpu.max").read_text().split()[:2]
            if quota != "max" and int(period) > 0:
                limits.append(int(quota) / int(period))
            continue
        except (OSError, ValueError):
            pass
        try:
            quota = int((d / "cpu.cfs_quota_us").read_text())
            period = int((d / "cpu.cfs_period_us").read_text())
            if quota > 0 and period > 0:
                limits.append(quota / period)
        except (OSError, ValueError):
            pass
    return min(limits) if limits else None


def usable_cpus() -> int:
    """Cores this process may run on: min(affinity mask, cgroup quota rounded up), at least 1."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):   # macOS, Windows
        n = os.cpu_count() or 1
    limit = cgroup_cpu_limit()
    if limit is not None:
        n = min(n, max(1, math.ceil(limit - 1e-9)))
    return max(1, n)


def default_reader_threads() -> int:
    """Reader threads when none are asked for: the usable cores, at most MAX_READER_THREADS."""
    return min(usable_cpus(), MAX_READER_THREADS)
