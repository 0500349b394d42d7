"""Cores this process may use: a real affinity mask (set in a child process) and cgroup quota files."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from fastgicn.cpus import MAX_READER_THREADS, cgroup_cpu_limit, default_reader_threads, usable_cpus


def own_cgroup() -> str:
    for line in open("/proc/self/cgroup").read().splitlines():
        if line.startswith("0::"):
            return line[3:].lstrip("/")
    return ""


def test_cgroup_v2_quota_of_this_process_or_a_parent(tmp_path):
    rel = own_cgroup()
    leaf = tmp_path / rel
    leaf.mkdir(parents=True, exist_ok=True)
    (leaf / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_limit(tmp_path) is None
    (tmp_path / "cpu.max").write_text("250000 100000\n")        # a parent's quota of 2.5 cores binds
    assert cgroup_cpu_limit(tmp_path) == pytest.approx(2.5)
    (leaf / "cpu.max").write_text("50000 100000\n")
    assert cgroup_cpu_limit(tmp_path) == pytest.approx(0.5)


def test_cgroup_v1_quota(tmp_path):
    d = tmp_path / "cpu"
    d.mkdir()
    (d / "cpu.cfs_quota_us").write_text("-1\n")
    (d / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpu_limit(tmp_path) is None
    (d / "cpu.cfs_quota_us").write_text("300000\n")
    assert cgroup_cpu_limit(tmp_path) == pytest.approx(3.0)


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity on this platform")
def test_affinity_mask_bounds_the_reader_threads():
    cpu = sorted(os.sched_getaffinity(0))[0]
    code = (f"import os; os.sched_setaffinity(0, {{{cpu}}}); "
            "from fastgicn.cpus import usable_cpus, default_reader_threads; "
            "print(usable_cpus(), default_reader_threads())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["1", "1"]
    assert 1 <= usable_cpus() <= len(os.sched_getaffinity(0))
    assert default_reader_threads() == min(usable_cpus(), MAX_READER_THREADS)
