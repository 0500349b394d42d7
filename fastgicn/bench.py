"""`python -m fastgicn.bench`: how fast each engine backend runs the model here, and how close to the device's peak.

For each available backend x precision:
  - latency per patch at batch 1 (p50 / p95 / p99 over `--iters` forwards, input already on the device);
  - throughput (patches/s) at each batch size of `--batch`, and the best of them;
  - achieved TFLOP/s (2 x MACs per patch from fastgicn.models.summary.gmacs) and the fraction of the device's
    dense peak for that precision (a datasheet table for H100 / H200 / A100; "unknown" on CPU);
  - peak device memory (torch allocator and, for TensorRT/ONNX Runtime, the driver's used-memory delta) and
    peak host RSS while that backend was built and run; build time (export / compile / engine build);
  - relative error of the logits against the fp32 torch reference on the same random tiles.
Then, with the fastest backend: streaming (`Engine.stream`) over an in-memory image and, when the slide pipeline
is installed, end to end on a synthetic slide with seconds per stage and the ratio end-to-end / model-only
throughput (1.0 means the pipeline keeps the device busy).

Then the host ceiling: the whole flow (`segment_slide`, every output) with a zero-cost model (constant logits)
on synthetic slides at 0.5 um/px (an Aperio 1/4/16 layout, read at level 0 reduced 2x, and a power-of-two one),
in tiles/s against the raw decode of the same tiles by the same number of reader threads in the same run, and
their ratio (issue 9's target: >= 0.5), with the report's seconds per stage (`--no-host` skips it).

Table on the terminal; `--json FILE` for machines. Defaults finish in about a minute on a small CPU (width 0.125,
256-pixel tiles, torch + onnxruntime) and run the paper's full model at 512 x 512 on a GPU.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from .errors import BackendUnavailable, ConfigError, EngineBuildError, FastGicnError
from .outputs.report import peak_rss_mb

FORMAT = "fastgicn-bench-1"
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
# The goals for one H100, full model at 512 x 512, fp16.
GOALS = {"patches_per_s": 1500.0, "latency_p50_ms": 3.0, "end_to_end_ratio": 0.90, "compiled_over_default": 1.3}


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


def measure_throughput(forward, batch: int, size: int, device: torch.device, iters: int, warmup: int = 2) -> dict:
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
            "cpu_count": os.cpu_count(), "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "device": str(device), "device_name": None, "is_cpu_run": device.type == "cpu"}
    versions = {"torch": torch.__version__, "numpy": np.__version__}
    for mod in ("onnx", "onnxruntime", "tensorrt", "triton"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:
            versions[mod] = None
    from . import __version__
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


# -- one backend x precision ---------------------------------------------------------------------------------
def bench_backend(model, name: str, precision: str, device: torch.device, args, flops_per_patch: float,
                  reference: dict, options: dict | None = None, label: str | None = None) -> dict:
    from .engine import Engine
    from .engine.base import relative_error

    row = {"backend": label or name, "precision": precision, "status": "ok"}
    batches = sorted(set(args.batch))
    options = dict(options or {})
    if name == "onnxruntime" and args.threads:
        options.setdefault("threads", args.threads)
    if name == "compiled" and device.type == "cuda":
        options.setdefault("graph_batch_sizes", tuple(batches))
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    used0 = _device_used_mb(device)
    _host_peak_reset()
    t0 = time.perf_counter()
    try:
        engine = Engine(model, backend=name, precision=precision, device=device, batch_size=max(batches),
                        tile_size=args.size, verify=False, **options)
        for b in batches:  # build every batch size up front (compile / CUDA graph capture), outside the timings
            engine.backend.forward(_inputs(b, args.size, device, sets=1)[0])
        _sync(device)
    except (BackendUnavailable, EngineBuildError, ConfigError) as exc:
        row.update(status="unavailable" if isinstance(exc, BackendUnavailable) else "failed", reason=str(exc))
        return row
    row["build_s"] = time.perf_counter() - t0
    row["description"] = engine.backend.description
    fwd = engine.backend.forward
    out = engine.predict(reference["x"].to(device)).float().cpu()
    row["rel_err_vs_torch_fp32"] = relative_error(out, reference["logits"])
    row["label_agreement"] = float((out.argmax(1) == reference["logits"].argmax(1)).float().mean())
    row["latency_ms"] = measure_latency(fwd, args.size, device, args.iters)
    row["throughput"] = [measure_throughput(fwd, b, args.size, device, args.iters) for b in batches]
    best = max(row["throughput"], key=lambda t: t["patches_per_s"])
    row["best_batch"], row["patches_per_s"] = best["batch"], best["patches_per_s"]
    row["tflops"] = best["patches_per_s"] * flops_per_patch / 1e12
    peak = peak_tflops(row_device_name(device), precision)
    row["peak_tflops"] = peak
    row["fraction_of_peak"] = row["tflops"] / peak if peak else None
    row["host_peak_rss_mb"] = peak_rss_mb()
    if device.type == "cuda":
        row["device_peak_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        used1 = _device_used_mb(device)
        row["device_used_delta_mb"] = None if used0 is None or used1 is None else used1 - used0
    row["_engine"] = engine
    return row


def row_device_name(device: torch.device) -> str | None:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else None


# -- streaming and end to end ------------------------------------------------------------------------------
def bench_streaming(engine, model_pps: float, tiles_side: int, overlap: int) -> dict:
    """Push a synthetic image through Engine.stream row by row; tiles/s against model-only throughput."""
    t = engine.tile_size
    stride = t - overlap
    side = t + (tiles_side - 1) * stride
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
    stream = engine.stream(width=side, height=side, overlap=overlap)
    t_tile = 0.0
    regions = 0
    t0 = time.perf_counter()
    for l0_x, l0_y in stream.tile_positions():
        s0 = time.perf_counter()
        tile = np.ascontiguousarray(image[l0_y:l0_y + t, l0_x:l0_x + t])
        t_tile += time.perf_counter() - s0
        regions += len(stream.push(tile, int(l0_x), int(l0_y)))
    regions += len(stream.close())
    total = time.perf_counter() - t0
    n = stream.n_rows * stream.n_cols
    return {"tiles": n, "overlap": overlap, "regions": regions, "seconds": total, "tiles_per_s": n / total,
            "seconds_per_stage": {"tile": t_tile, "predict (H2D+forward+D2H)": stream.seconds["predict"],
                                  "stitch": stream.seconds["stitch"]},
            "max_buffered_regions": stream.max_buffered_regions,
            "ratio_to_model_only": (n / total) / model_pps if model_pps else None,
            "note": "in-memory image, no file reading or writing: the engine's own streaming overhead"}


def bench_end_to_end(engine, model_pps_at_batch: float | None, slide_side: int) -> dict:
    try:
        from . import pipeline  # noqa: F401
        from .synth import write_synthetic_slide
    except ImportError as exc:
        return {"available": False, "reason": f"the slide pipeline or fastgicn.synth is not installed ({exc})"}
    with tempfile.TemporaryDirectory(prefix="fastgicn-bench-") as tmp:
        t0 = time.perf_counter()
        slide, mask = write_synthetic_slide(Path(tmp) / "bench.svs", slide_side, slide_side, seed=0)
        synth_s = time.perf_counter() - t0
        try:
            result = engine.segment_slide(slide, Path(tmp) / "out", progress=False)
        except FastGicnError as exc:
            return {"available": False, "reason": f"segment_slide failed: {exc}"}
    report = result.report or {}
    sec = report.get("seconds", {})
    tiles = report.get("tiles", {})
    pps = report.get("tiles_per_second")
    stages = {"read (reader threads, overlapped)": sec.get("read_threads"),
              "tile/wait for batches": sec.get("wait_for_batches"),
              "H2D + normalise": sec.get("normalise"), "forward": sec.get("forward"),
              "D2H + softmax": sec.get("postprocess"), "stitch": sec.get("stitch"),
              "write (TIFF rows, polygons, overlay)": sum(sec.get(k) or 0.0 for k in
                                                          ("outputs_streaming", "finish_tiffs", "polygons",
                                                           "overlay")),
              "open + tissue": (sec.get("open") or 0.0) + (sec.get("tissue") or 0.0)}
    return {"available": True, "slide": f"synthetic {slide_side} x {slide_side} (written in {synth_s:.1f} s)",
            "tiles_read": tiles.get("read"), "tiles_segmented": tiles.get("segmented"), "tiles_per_s": pps,
            "seconds_total": sec.get("total"), "seconds_segment_loop": sec.get("segment_loop"),
            "seconds_per_stage": stages,
            "ratio_to_model_only": pps / model_pps_at_batch if pps and model_pps_at_batch else None,
            "dice_vs_synthetic_truth": None}


# -- the host ceiling: the whole flow with a model that costs nothing ----------------------------------------
HOST_CEILING_GOAL = 0.5  # issue 9: the whole flow at >= 50% of the raw decode rate of the same tiles


class ZeroCostModel(torch.nn.Module):
    """A model that costs nothing: constant logits (N x `classes` x H x W, at the input resolution), with the
    `mean` / `std` normalisation buffers of `create_model` models. The pipeline around it is all that is timed.

    The logits favour class 0 (normal) everywhere: the flow's cost without tumour regions to trace."""

    model_name = "zero_cost"

    def __init__(self, classes: int = 2, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)):
        super().__init__()
        self.model_kwargs = {"classes": classes}
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32))
        logits = torch.zeros(1, classes, 1, 1)
        logits[:, 0] = 4.0
        self.register_buffer("logits", logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits.to(x.dtype).expand(x.shape[0], -1, x.shape[2], x.shape[3])


def _segment_slide_fn():
    """`segment_slide` wherever this version keeps it (the top-level export, fastgicn.pipeline, or
    fastgicn.pipeline)."""
    import importlib

    import fastgicn

    fn = getattr(fastgicn, "segment_slide", None)
    if fn is not None:
        return fn
    for mod in ("fastgicn.pipeline", "fastgicn.pipeline"):
        try:
            return importlib.import_module(mod).segment_slide
        except (ModuleNotFoundError, AttributeError):
            continue
    from .pipeline import segment_slide  # raises the ImportError that says what is missing

    return segment_slide


def _load_average() -> list[float] | None:
    return [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None


def decode_seconds(slide, tiles: np.ndarray, level, tile_size: int, threads: int,
                   white_threshold: int = 220) -> tuple[float, np.ndarray]:
    """Raw decode: `threads` threads `read_into` each tile of `tiles` ((N, >=2) l0_x, l0_y) at `level` (an index
    or a Resolution) into a per-thread `tile_size`^2 buffer, nothing else. (seconds, background count per tile)."""
    import threading

    background = np.zeros(len(tiles), np.int64)
    threads = max(1, min(int(threads), max(1, len(tiles))))
    barrier = threading.Barrier(threads + 1)
    errors: list[BaseException] = []

    def work(k: int) -> None:
        buf = np.empty((tile_size, tile_size, 3), np.uint8)
        barrier.wait()
        try:
            for i in range(k, len(tiles), threads):
                background[i] = slide.read_into(buf, int(tiles[i, 0]), int(tiles[i, 1]), level, white_threshold)
        except BaseException as exc:  # raised by the caller's thread
            errors.append(exc)

    workers = [threading.Thread(target=work, args=(k,), daemon=True) for k in range(threads)]
    for t in workers:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in workers:
        t.join()
    dt = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return dt, background


def _candidates(slide, config):
    from .tiling import read_resolution_for, tissue_tiles
    from .slide.tissue import tissue_mask

    # the pipeline's own candidate tiles: tissue mask from a low level, tiles touching it
    return read_resolution_for(slide, config), tissue_tiles(slide, config, mask=tissue_mask(slide), read=False)


def _median(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.median(values)) if values else None


def _stage_medians(reports: list[dict]) -> dict:
    keys = []
    for r in reports:
        keys += [k for k in (r.get("seconds") or {}) if k not in keys]
    return {k: _median([(r.get("seconds") or {}).get(k) for r in reports]) for k in keys}


def host_ceiling(slide_path, config, *, threads: int = 2, repeats: int = 3, work_dir=None,
                 model: torch.nn.Module | None = None, stitch: str = "blend") -> dict:
    """The whole flow (`segment_slide`, all outputs) with a zero-cost model against the raw decode of the same
    candidate tiles at the same thread count, interleaved over `repeats` rounds in this process.

    Rates are candidate tiles per second: the flow's over the wall time of `segment_slide` (open, tissue mask,
    read, reject glass, batch, normalise, forward, stitch, write every output, polygons, overlay, report) and,
    for reference, over its segment loop (`report["tiles_per_second"]`). The ratio is the median of the per-round
    ratios (each pair back to back)."""
    from .slide import open_slide
    segment_slide = _segment_slide_fn()

    model = model if model is not None else ZeroCostModel()
    slide = open_slide(slide_path)
    try:
        level, tiles = _candidates(slide, config)
        reader, reader_note = getattr(slide, "reader", None), getattr(slide, "reader_note", None)
        t = config.tile_size
        decode_seconds(slide, tiles[: 2 * threads], level, t, threads)  # warm: page cache, thread state
        rounds, reports = [], []
        with tempfile.TemporaryDirectory(prefix="fastgicn-host-", dir=work_dir) as tmp:
            for k in range(max(1, repeats)):
                row = {"load_average": _load_average()}
                for step in (("decode", "flow") if k % 2 == 0 else ("flow", "decode")):
                    if step == "decode":
                        dt, background = decode_seconds(slide, tiles, level, t, threads, config.white_threshold)
                        row["decode_tiles_per_s"] = len(tiles) / dt if len(tiles) else None
                    else:
                        t0 = time.perf_counter()
                        res = segment_slide(str(slide_path), Path(tmp) / f"round{k}", model, config,
                                            threads=threads, progress=False, stitch=stitch)
                        wall = time.perf_counter() - t0
                        rep = res.report or {}
                        reports.append(rep)
                        row["flow_seconds"] = wall
                        row["flow_tiles_per_s"] = len(tiles) / wall if len(tiles) else None
                        row["flow_loop_tiles_per_s"] = rep.get("tiles_per_second")
                        row["tiles"] = rep.get("tiles")
                row["ratio"] = (row["flow_tiles_per_s"] / row["decode_tiles_per_s"]
                                if row.get("flow_tiles_per_s") and row.get("decode_tiles_per_s") else None)
                # the pipeline's reading stage: its reads' per-thread rate (wall, and CPU) over raw decode's
                sec = rep.get("seconds") or {}
                per_thread = row["decode_tiles_per_s"] / threads if row.get("decode_tiles_per_s") else None
                n_read = (rep.get("tiles") or {}).get("read") or 0
                for key, stage in (("read_stage_over_decode", "read_threads"),
                                   ("read_stage_cpu_over_decode", "read_threads_cpu")):
                    row[key] = (n_read / sec[stage] / per_thread) if per_thread and sec.get(stage) else None
                row["ratio_loop"] = (row["flow_loop_tiles_per_s"] / row["decode_tiles_per_s"]
                                     if row.get("flow_loop_tiles_per_s") and row.get("decode_tiles_per_s") else None)
                rounds.append(row)
    finally:
        slide.close()
    last = reports[-1] if reports else {}
    ratio = _median([r["ratio"] for r in rounds])
    return {"slide": {"dimensions": list(slide.dimensions), "level_downsamples": list(slide.level_downsamples),
                      "mpp": slide.mpp, "reader": reader, "reader_note": reader_note},
            "read": last.get("read") or level.to_dict(slide.mpp), "config": config.to_dict(), "threads": threads,
            "torch_threads": torch.get_num_threads(), "stitch": stitch, "model": getattr(model, "model_name", None),
            "candidate_tiles": int(len(tiles)), "tiles": last.get("tiles"), "repeats": len(rounds),
            "decode_tiles_per_s": _median([r["decode_tiles_per_s"] for r in rounds]),
            "flow_tiles_per_s": _median([r["flow_tiles_per_s"] for r in rounds]),
            "flow_loop_tiles_per_s": _median([r["flow_loop_tiles_per_s"] for r in rounds]),
            "ratio": ratio, "ratio_loop": _median([r["ratio_loop"] for r in rounds]),
            "read_stage_over_decode": _median([r.get("read_stage_over_decode") for r in rounds]),
            "read_stage_cpu_over_decode": _median([r.get("read_stage_cpu_over_decode") for r in rounds]),
            "goal": HOST_CEILING_GOAL, "met": None if ratio is None else ratio >= HOST_CEILING_GOAL,
            "seconds_per_stage_median": _stage_medians(reports),
            "rounds": [{k: v for k, v in r.items() if k != "tiles"} for r in rounds],
            "note": "flow = segment_slide wall time over the candidate tiles (all outputs); decode = the same tiles "
                    "read_into per-thread buffers by the same number of threads, no model; ratio = median of the "
                    "per-round ratios"}


def _kept_batches(slide, config, threads: int):
    """The tiles the pipeline would segment (candidates minus glass), as uint8 N x H x W x 3 batches."""
    from .tiling.grid import keep_tile

    level, tiles = _candidates(slide, config)
    t = config.tile_size
    _, background = decode_seconds(slide, tiles, level, t, threads, config.white_threshold)
    kept = tiles[keep_tile(background, t * t, config.min_tissue_fraction)]
    batches = []
    for s in range(0, len(kept), config.batch_size):
        part = kept[s:s + config.batch_size]
        arr = np.empty((len(part), t, t, 3), np.uint8)
        for i, (x, y) in enumerate(part[:, :2]):
            slide.read_into(arr[i], int(x), int(y), level)
        batches.append(torch.from_numpy(arr))
    return batches, int(len(kept)), int(len(tiles))


def model_only_ratio(slide_path, model: torch.nn.Module, config, *, threads: int = 2, repeats: int = 2,
                     device="cpu", work_dir=None, weights=None) -> dict:
    """With a real model: end to end (`segment_slide` wall time, all outputs) against model-only (normalise +
    forward on the same batches of the tiles the pipeline segments, already in memory), interleaved."""
    from .models.preprocess import to_model_input
    from .slide import open_slide
    segment_slide = _segment_slide_fn()

    device = torch.device(device)
    model = model.to(device).eval()
    slide = open_slide(slide_path)
    try:
        batches, n_kept, n_candidates = _kept_batches(slide, config, threads)
    finally:
        slide.close()
    batches = [b.to(device) for b in batches]

    def model_only() -> float:
        with torch.inference_mode():
            t0 = time.perf_counter()
            for b in batches:
                model(to_model_input(b, model.mean, model.std))
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            return time.perf_counter() - t0

    if batches:
        model_only()  # warm up
    rounds, reports = [], []
    with tempfile.TemporaryDirectory(prefix="fastgicn-e2e-", dir=work_dir) as tmp:
        for k in range(max(1, repeats)):
            row = {"load_average": _load_average()}
            for step in (("model", "e2e") if k % 2 == 0 else ("e2e", "model")):
                if step == "model":
                    dt = model_only()
                    row["model_only_tiles_per_s"] = n_kept / dt if n_kept else None
                else:
                    t0 = time.perf_counter()
                    res = segment_slide(str(slide_path), Path(tmp) / f"round{k}", model, config, device,
                                        threads=threads, progress=False, weights=weights)
                    wall = time.perf_counter() - t0
                    rep = res.report or {}
                    reports.append(rep)
                    seg = (rep.get("tiles") or {}).get("segmented", n_kept)
                    row["segmented"] = seg
                    row["end_to_end_tiles_per_s"] = seg / wall if seg else None
            row["ratio"] = (row["end_to_end_tiles_per_s"] / row["model_only_tiles_per_s"]
                            if row.get("end_to_end_tiles_per_s") and row.get("model_only_tiles_per_s") else None)
            rounds.append(row)
    return {"model": getattr(model, "model_name", type(model).__name__),
            "model_kwargs": getattr(model, "model_kwargs", {}), "weights": None if weights is None else str(weights),
            "device": str(device), "config": config.to_dict(), "threads": threads,
            "torch_threads": torch.get_num_threads(), "candidate_tiles": n_candidates, "segmented_tiles": n_kept,
            "model_only_tiles_per_s": _median([r["model_only_tiles_per_s"] for r in rounds]),
            "end_to_end_tiles_per_s": _median([r["end_to_end_tiles_per_s"] for r in rounds]),
            "ratio": _median([r["ratio"] for r in rounds]), "repeats": len(rounds),
            "seconds_per_stage_median": _stage_medians(reports), "rounds": rounds,
            "note": "end to end = segmented tiles over segment_slide's wall time (all outputs); model-only = "
                    "normalise + forward on the same tiles' batches, in memory; ratio = median per round"}


def write_bench_slide(path, side: int, layout: str) -> Path:
    """A synthetic slide (0.25 um/px) for the host ceiling: `layout` "aperio" (levels 1/4/16: 0.5 um/px is
    level 0 box-reduced 2x) or "pow2" (a stored level at 0.5 um/px)."""
    from .synth import write_synthetic_slide

    slide, mask = write_synthetic_slide(path, side, side, seed=0, layout=layout)
    mask.unlink(missing_ok=True)
    return slide


def bench_host_ceiling(tile_size: int, batch: int, slide_side: int, threads: int, repeats: int = 2,
                       layouts=("aperio", "pow2")) -> dict:
    """The host ceiling at 0.5 um/px on one synthetic slide per layout (see `host_ceiling`)."""
    from .config import TileConfig

    config = TileConfig(tile_size=tile_size, target_mpp=0.5, batch_size=batch)
    out = {"target_mpp": 0.5, "slide_side_level0": slide_side, "layouts": {}}
    with tempfile.TemporaryDirectory(prefix="fastgicn-bench-host-") as tmp:
        for layout in layouts:
            try:
                path = write_bench_slide(Path(tmp) / f"host_{layout}.svs", slide_side, layout)
                out["layouts"][layout] = {"available": True, **host_ceiling(path, config, threads=threads,
                                                                            repeats=repeats, work_dir=tmp)}
            except FastGicnError as exc:
                out["layouts"][layout] = {"available": False, "reason": str(exc)}
    return out


# -- the run -------------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m fastgicn.bench", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet50_gicn_gpp", help="registered model name")
    p.add_argument("--width", type=float, default=None, help="channel multiplier (default 1.0 on GPU, 0.125 on CPU)")
    p.add_argument("--k", type=int, default=7, help="GICN kernel size")
    p.add_argument("--checkpoint", type=Path, default=None, help="bench a trained checkpoint instead")
    p.add_argument("--size", type=int, default=None, help="tile side (default 512 on GPU, 256 on CPU)")
    p.add_argument("--batch", type=str, default=None,
                   help="comma-separated batch sizes for throughput (default 1,32,128 GPU; 1,2,4 CPU); each is "
                        "compiled / graphed / in the TensorRT profile")
    p.add_argument("--backend", type=str, default="default",
                   help="comma-separated backends, 'all', or 'default' (all on GPU; torch,onnxruntime on CPU)")
    p.add_argument("--precision", type=str, default="auto",
                   help="comma-separated precisions (default fp16,bf16 on GPU, fp32 on CPU)")
    p.add_argument("--iters", type=int, default=None, help="batch-1 latency samples (default 200 GPU, 20 CPU)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (torch.set_num_threads) and ONNX Runtime (default: theirs, one "
                        "per core; 1 when the load average already exceeds the cores: on shared cores OpenMP "
                        "stalls slowed eager torch 30x on a busy 2-core machine)")
    p.add_argument("--no-e2e", action="store_true", help="skip the streaming, end-to-end and host-ceiling runs")
    p.add_argument("--no-host", action="store_true",
                   help="skip the host ceiling (the whole flow with a zero-cost model against raw decode)")
    p.add_argument("--reader-threads", type=int, default=None,
                   help="reader threads for the host ceiling (default: the usable cores, as segment_slide)")
    p.add_argument("--host-repeats", type=int, default=2, help="interleaved rounds of the host ceiling")
    p.add_argument("--slide-size", type=int, default=None, help="synthetic slide side (default 2048 CPU, 16384 GPU)")
    p.add_argument("--json", type=Path, default=None, help="write the full results here")
    args = p.parse_args(argv)
    return args


def _fill_defaults(args, device: torch.device) -> None:
    gpu = device.type == "cuda"
    args.width = args.width if args.width is not None else (1.0 if gpu else 0.125)
    args.size = args.size or (512 if gpu else 256)
    args.iters = args.iters or (200 if gpu else 20)
    args.slide_size = args.slide_size or (16384 if gpu else 2048)
    try:
        args.batch = [int(b) for b in (args.batch or ("1,32,128" if gpu else "1,2,4")).split(",")]
    except ValueError:
        raise ConfigError(f"--batch {args.batch!r}: give comma-separated positive integers, e.g. 1,8,32") from None
    if any(b < 1 for b in args.batch):
        raise ConfigError(f"--batch {args.batch}: batch sizes must be positive")
    from .engine.engine import BACKENDS
    if args.backend == "default":
        args.backends = list(BACKENDS) if gpu else ["torch", "onnxruntime"]
    elif args.backend == "all":
        args.backends = list(BACKENDS)
    else:
        args.backends = [b.strip() for b in args.backend.split(",") if b.strip()]
        unknown = sorted(set(args.backends) - set(BACKENDS))
        if unknown:
            raise ConfigError(f"--backend: unknown {unknown}; use some of {', '.join(BACKENDS)}, 'all' or 'default'")
    args.precisions = (["fp16", "bf16"] if gpu else ["fp32"]) if args.precision == "auto" else \
        [p.strip() for p in args.precision.split(",")]
    from .engine.base import PRECISIONS
    bad = sorted(set(args.precisions) - set(PRECISIONS))
    if bad:
        raise ConfigError(f"--precision: unknown {bad}; use some of {', '.join(PRECISIONS)}")


def run(args) -> dict:
    from .engine.base import reference_copy, resolve_device
    from .models import create_model
    from .models.preprocess import to_model_input
    from .models.summary import gmacs

    device = resolve_device(args.device)
    _fill_defaults(args, device)
    if args.threads is None and device.type == "cpu" and hasattr(os, "getloadavg") \
            and os.getloadavg()[0] > (os.cpu_count() or 1):
        # cores already busy: one thread per runtime, else torch's OpenMP threads stall (30x seen)
        args.threads = 1
        args.auto_threads_note = (f"load average {os.getloadavg()[0]:.1f} > {os.cpu_count()} cores at start: "
                                  "ran with 1 thread per runtime (--threads N overrides)")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.checkpoint:
        from .checkpoint import model_from_checkpoint
        model = model_from_checkpoint(args.checkpoint, "cpu")
    else:
        kwargs = {"width": args.width} if args.model == "resnet50_gpp" else {"k": args.k, "width": args.width}
        torch.manual_seed(0)
        model = create_model(args.model, **kwargs).eval()
    with torch.device("meta"):
        meta_model = create_model(model.model_name, **model.model_kwargs).eval()
    macs = gmacs(meta_model, args.size)
    flops_per_patch = 2 * macs * 1e9
    # the fp32 torch reference on the same random tiles, for every backend's error
    g = torch.Generator().manual_seed(99)
    x_ref = torch.randint(0, 256, (2, args.size, args.size, 3), dtype=torch.uint8, generator=g)
    ref_model = reference_copy(model).to(device)
    with torch.inference_mode():
        ref_logits = ref_model(to_model_input(x_ref.to(device), model.mean, model.std)).float().cpu()
    del ref_model
    reference = {"x": x_ref, "logits": ref_logits}

    result = {"format": FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "command": "python -m fastgicn.bench " + " ".join(shlex.quote(a) for a in (args.argv or [])),
              "machine": machine_info(device),
              "model": {"name": model.model_name, "kwargs": model.model_kwargs, "tile": args.size,
                        "gmacs_per_patch": macs, "gflop_per_patch": 2 * macs,
                        "params_m": sum(p.numel() for p in model.parameters()) / 1e6},
              "config": {"backends": args.backends, "precisions": args.precisions, "batches": args.batch,
                         "iters": args.iters, "threads": args.threads or torch.get_num_threads()},
              "results": [], "notes": []}
    if device.type == "cpu":
        result["notes"].append(
            "CPU run: figures are for this CPU, not a GPU; device peak TFLOP/s is unknown on CPU. The GPU goals "
            "(1,500 patches/s, 3 ms, 90% end-to-end, 1.3x torch.compile) apply to one H100, full model, 512, fp16.")
        if args.backend == "default":
            result["notes"].append("compiled is left out by default on CPU: Inductor's C++ compile takes 20-80 s "
                                   "per shape on a small CPU; pass --backend all or --backend compiled")
    if getattr(args, "auto_threads_note", None):
        result["notes"].append(args.auto_threads_note)
    rows = []
    best = None  # the fastest real backend so far, kept built for the streaming and end-to-end runs
    for name in args.backends:
        for precision in args.precisions:
            row = bench_backend(model, name, precision, device, args, flops_per_patch, reference)
            rows.append(row)
            if name == "compiled" and device.type == "cuda" and row["status"] == "ok":
                # torch.compile's default on the same model and precision: the baseline of the 1.3x goal
                base = bench_backend(model, "compiled", precision, device, args, flops_per_patch, reference,
                                     options={"compile_options": {}, "cuda_graphs": False, "triton": False,
                                              "channels_last": False},
                                     label="torch.compile(default)")
                rows.append(base)
                _release(base)
                row["speedup_over_compile_default"] = (row["patches_per_s"] / base["patches_per_s"]
                                                       if base["status"] == "ok" else None)
            if row["status"] == "ok" and (best is None or row["patches_per_s"] > best["patches_per_s"]):
                if best is not None:
                    _release(best)
                best = row
            elif row is not best:
                _release(row)
    result["results"] = [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]
    if best is not None and not args.no_e2e:
        engine = best["_engine"]
        model_pps = next(t["patches_per_s"] for t in best["throughput"] if t["batch"] == max(args.batch))
        result["streaming"] = {"backend": best["backend"], "precision": best["precision"],
                               **bench_streaming(engine, model_pps, tiles_side=4 if device.type == "cpu" else 16,
                                                 overlap=args.size // 8)}
        e2e = bench_end_to_end(engine, model_pps, args.slide_size)
        result["end_to_end"] = {"backend": best["backend"], "precision": best["precision"],
                                "batch": max(args.batch), **e2e}
    if best is not None:
        _release(best)
    if not args.no_e2e and not args.no_host:
        from .cpus import default_reader_threads

        threads = args.reader_threads or default_reader_threads()
        try:
            result["host_ceiling"] = {"reader_threads": threads, "load_average_before": _load_average(),
                                      **bench_host_ceiling(args.size, max(args.batch), args.slide_size, threads,
                                                           repeats=args.host_repeats)}
        except ImportError as exc:
            result["host_ceiling"] = {"available": False, "reason": f"the slide pipeline is not installed ({exc})"}
    result["goals"] = goals(result, device)
    return result


def _release(row: dict) -> None:
    row.pop("_engine", None)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def goals(result: dict, device: torch.device) -> dict:
    """The issue's H100 goals, judged only where they apply (full model, 512, fp16, an H100)."""
    name = result["machine"].get("device_name") or ""
    model = result["model"]
    applies = device.type == "cuda" and "H100" in name and model["kwargs"].get("width", 1.0) == 1.0 \
        and model["tile"] == 512
    out = {"applies": applies, "targets": GOALS}
    if not applies:
        out["why_not"] = ("not an H100 with the full model at 512 x 512" if device.type == "cuda" else
                          "CPU run: the goals are for one H100 GPU")
        return out
    fp16 = [r for r in result["results"] if r["status"] == "ok" and r["precision"] == "fp16"
            and r["backend"] != "torch.compile(default)"]
    if fp16:
        best = max(fp16, key=lambda r: r["patches_per_s"])
        fastest_latency = min(r["latency_ms"]["p50"] for r in fp16)
        out["patches_per_s"] = {"value": best["patches_per_s"], "backend": best["backend"],
                                "met": best["patches_per_s"] >= GOALS["patches_per_s"]}
        out["latency_p50_ms"] = {"value": fastest_latency, "met": fastest_latency <= GOALS["latency_p50_ms"]}
    comp = [r for r in result["results"] if r.get("speedup_over_compile_default") and r["precision"] == "fp16"]
    if comp:
        v = comp[0]["speedup_over_compile_default"]
        out["compiled_over_default"] = {"value": v, "met": v >= GOALS["compiled_over_default"]}
    e2e = result.get("end_to_end", {})
    if e2e.get("ratio_to_model_only"):
        out["end_to_end_ratio"] = {"value": e2e["ratio_to_model_only"],
                                   "met": e2e["ratio_to_model_only"] >= GOALS["end_to_end_ratio"]}
    return out


# -- output --------------------------------------------------------------------------------------------------
def _f(v, fmt="{:.1f}", none="-"):
    return none if v is None else fmt.format(v)


def format_table(result: dict) -> str:
    m = result["machine"]
    model = result["model"]
    lines = [f"fastgicn bench on {m['device_name']} ({m['device']}){' - CPU RUN' if m['is_cpu_run'] else ''}; "
             f"torch {m['versions']['torch']}, onnxruntime {m['versions']['onnxruntime'] or '-'}, "
             f"tensorrt {m['versions']['tensorrt'] or '-'}; load average "
             f"{', '.join(f'{v:.1f}' for v in m['load_average'] or [])}",
             f"model {model['name']} {model['kwargs']} at {model['tile']} x {model['tile']}: "
             f"{model['gflop_per_patch']:.2f} GFLOP per patch", ""]
    head = (f"{'backend':<24}{'prec':>5}{'build s':>9}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'best b':>7}"
            f"{'patch/s':>10}{'TFLOP/s':>9}{'% peak':>8}{'rel err':>9}{'host MB':>9}{'dev MB':>8}")
    lines += [head, "-" * len(head)]
    for r in result["results"]:
        if r["status"] != "ok":
            lines.append(f"{r['backend']:<24}{r['precision']:>5}  {r['status']}: {r['reason'][:150]}")
            continue
        lat = r["latency_ms"]
        frac = r["fraction_of_peak"]
        lines.append(f"{r['backend']:<24}{r['precision']:>5}{r['build_s']:>9.1f}{lat['p50']:>9.2f}{lat['p95']:>9.2f}"
                     f"{lat['p99']:>9.2f}{r['best_batch']:>7}{r['patches_per_s']:>10.1f}"
                     f"{_f(r['tflops'], '{:.3f}'):>9}{_f(None if frac is None else 100 * frac, '{:.1f}', 'unknown'):>8}"
                     f"{r['rel_err_vs_torch_fp32']:>9.1e}{_f(r.get('host_peak_rss_mb'), '{:.0f}'):>9}"
                     f"{_f(r.get('device_peak_allocated_mb'), '{:.0f}'):>8}")
    lines.append("")
    for r in result["results"]:
        if r["status"] == "ok":
            tp = ", ".join(f"b{t['batch']}: {t['patches_per_s']:.1f}" for t in r["throughput"])
            extra = (f"; {r['speedup_over_compile_default']:.2f}x torch.compile(default)"
                     if r.get("speedup_over_compile_default") else "")
            lines.append(f"{r['backend']} {r['precision']}: patches/s by batch {tp}{extra}")
            lines.append(f"    {r['description']}")
    s = result.get("streaming")
    if s:
        st = ", ".join(f"{k} {v:.2f} s" for k, v in s["seconds_per_stage"].items())
        lines += ["", f"streaming ({s['backend']} {s['precision']}, {s['tiles']} tiles, overlap {s['overlap']}): "
                      f"{s['tiles_per_s']:.1f} tiles/s = {_f(s['ratio_to_model_only'], '{:.2f}')} x model-only; {st}"]
    e = result.get("end_to_end")
    if e:
        if e.get("available"):
            st = ", ".join(f"{k} {_f(v, '{:.2f}')} s" for k, v in e["seconds_per_stage"].items())
            lines += [f"end to end ({e['backend']} {e['precision']}, {e['slide']}, {e['tiles_read']} tiles): "
                      f"{_f(e['tiles_per_s'])} tiles/s = {_f(e['ratio_to_model_only'], '{:.2f}')} x model-only "
                      f"at batch {e['batch']}", f"    {st}"]
        else:
            lines.append(f"end to end: not run ({e['reason']})")
    h = result.get("host_ceiling")
    if h:
        lines += format_host_ceiling(h)
    g = result.get("goals", {})
    if g.get("applies"):
        for key in ("patches_per_s", "latency_p50_ms", "end_to_end_ratio", "compiled_over_default"):
            if key in g:
                lines.append(f"goal {key}: {g[key]['value']:.2f} vs {GOALS[key]} -> "
                             f"{'met' if g[key]['met'] else 'NOT met'}")
    for note in result.get("notes", []):
        lines.append(f"note: {note}")
    return "\n".join(lines)


def format_host_ceiling(h: dict) -> list[str]:
    if "layouts" not in h:
        return [f"host ceiling: not run ({h.get('reason')})"]
    lines = []
    for layout, r in h["layouts"].items():
        if not r.get("available"):
            lines.append(f"host ceiling ({layout}): not run ({r.get('reason')})")
            continue
        rd = r.get("read") or {}
        st = r["seconds_per_stage_median"]
        top = sorted(((k, v) for k, v in st.items() if v and k not in ("total", "segment_loop")),
                     key=lambda kv: -kv[1])[:5]
        lines += [f"host ceiling ({layout} layout, level {rd.get('level')} reduced {rd.get('reduction')}x, "
                  f"reader {r['slide']['reader']}, {r['candidate_tiles']} tiles of {r['config']['tile_size']} at "
                  f"{r['config']['target_mpp']} um/px, {r['threads']} reader threads): whole flow "
                  f"{_f(r['flow_tiles_per_s'])} tiles/s vs raw decode {_f(r['decode_tiles_per_s'])} tiles/s = "
                  f"{_f(r['ratio'], '{:.2f}')} (goal >= {r['goal']}; segment loop alone "
                  f"{_f(r['ratio_loop'], '{:.2f}')})",
                  "    seconds per stage: " + ", ".join(f"{k} {v:.2f}" for k, v in top) +
                  f"; total {_f(st.get('total'), '{:.2f}')}"]
    return lines


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    threads = torch.get_num_threads()
    try:
        args = parse_args(argv)
        args.argv = argv
        result = run(args)
    except FastGicnError as exc:
        print(f"fastgicn bench: error: {exc}", file=sys.stderr)
        return 2
    finally:
        torch.set_num_threads(threads)  # --threads is for the run, not for a caller of main()
    print(format_table(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1, default=str) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
