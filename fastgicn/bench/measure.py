"""The measurements: latency percentiles and throughput of a forward, device peaks and memory, the machine."""
from __future__ import annotations

import math
import os
import platform
import time

import numpy as np
import torch

# Dense (no sparsity) datasheet peaks in TFLOP/s: 16-bit tensor cores, and TF32 tensor cores for the fp32 path
# (cuDNN/Inductor use TF32 for fp32 convolutions by default). Matched on torch.cuda.get_device_name(), most
# specific first. Datasheet figures are leads, not measurements (METHOD.md): clocks under load are lower.
PEAK_TFLOPS = [
    ("H200 NVL", {"fp16": 835.5, "bf16": 835.5, "fp32": 417.5}),
    ("H200", {"fp16": 989.4, "bf16": 989.4, "fp32": 494.7}),
    ("H100 NVL", {"fp16": 835.5, "bf16": 835.5, "fp32": 417.5}),
    ("H100 PCIe", {"fp16": 756.5, "bf16": 756.5, "fp32": 378.0}),
    ("H100", {"fp16": 989.4, "bf16": 989.4, "fp32": 494.7}),  # SXM5 (e.g. "NVIDIA H100 80GB HBM3")
    ("A100", {"fp16": 312.0, "bf16": 312.0, "fp32": 156.0}),
]


def peak_tflops(device_name: str | None, precision: str) -> float | None:
    if not device_name:
        return None
    for key, peaks in PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return peaks.get(precision)
    return None


# -- measurements -----------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def percentiles(samples_ms: list[float]) -> dict:
    a = np.asarray(samples_ms, dtype=np.float64)
    return {"p50": float(np.percentile(a, 50)), "p95": float(np.percentile(a, 95)),
            "p99": float(np.percentile(a, 99)), "mean": float(a.mean()), "n": int(a.size)}


def _inputs(n: int, size: int, device: torch.device, sets: int = 3, seed: int = 0) -> list[torch.Tensor]:
    """Several random uint8 batches (never zeros; rotated so repeated runs do not just measure a cache)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=g).to(device)
            for _ in range(sets)]


def measure_latency(forward, size: int, device: torch.device, iters: int, warmup: int = 3) -> dict:
    xs = _inputs(1, size, device)
    with torch.inference_mode():
        for i in range(warmup):
            forward(xs[i % len(xs)])
        _sync(device)
        samples = []
        for i in range(iters):
            x = xs[i % len(xs)]
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                forward(x)
                end.record()
                end.synchronize()
                samples.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                forward(x)
                samples.append((time.perf_counter() - t0) * 1e3)
    return percentiles(samples)


def measure_throughput(forward, batch: int, size: int, device: torch.device, iters: int,
                       warmup: int = 2) -> dict:
    xs = _inputs(batch, size, device, seed=batch)
    reps = max(3, math.ceil(iters / batch))
    with torch.inference_mode():
        for i in range(warmup):
            forward(xs[i % len(xs)])
        _sync(device)
        t0 = time.perf_counter()
        for i in range(reps):
            forward(xs[i % len(xs)])
        _sync(device)
        dt = time.perf_counter() - t0
    return {"batch": batch, "reps": reps, "seconds": dt, "patches_per_s": batch * reps / dt,
            "ms_per_patch": dt * 1e3 / (batch * reps)}


def _host_peak_reset() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM (peak RSS) of this process
        return True
    except OSError:
        return False


def _device_used_mb(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    return (total - free) / 2**20


# -- machine -------------------------------------------------------------------------------------------------
def machine_info(device: torch.device) -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpu": _cpu_name(),
            "cpu_count": os.cpu_count(),
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "device": str(device), "device_name": None, "is_cpu_run": device.type == "cpu"}
    versions = {"torch": torch.__version__, "numpy": np.__version__}
    for mod in ("onnx", "onnxruntime", "tensorrt", "triton"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:
            versions[mod] = None
    from .. import __version__
    versions["fastgicn"] = __version__
    info["versions"] = versions
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(device_name=props.name, device_memory_gib=props.total_memory / 2**30,
                    compute_capability=f"{props.major}.{props.minor}", sm_count=props.multi_processor_count,
                    cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    else:
        info["device_name"] = info["cpu"]
    return info


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def row_device_name(device: torch.device) -> str | None:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else None

