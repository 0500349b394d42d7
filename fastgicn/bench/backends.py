"""One backend x precision (build, error, latency, throughput, memory), then the fastest one streaming and end
to end on a synthetic slide."""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ..errors import BackendUnavailable, ConfigError, EngineBuildError, FastGicnError
from ..outputs.report import peak_rss_mb
from .measure import (_device_used_mb, _host_peak_reset, _inputs, _sync, measure_latency, measure_throughput,
                      peak_tflops, row_device_name)


# -- one backend x precision ---------------------------------------------------------------------------------
def bench_backend(model, name: str, precision: str, device: torch.device, args, flops_per_patch: float,
                  reference: dict, options: dict | None = None, label: str | None = None) -> dict:
    from ..engine import Engine
    from ..engine.base import relative_error

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
        for b in batches:  # build every batch size up front (compile / CUDA graph capture), outside timings
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
        from .. import pipeline  # noqa: F401
        from ..synth import write_synthetic_slide
    except ImportError as exc:
        return {"available": False,
                "reason": f"the slide pipeline or fastgicn.synth is not installed ({exc})"}
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


def _release(row: dict) -> None:
    row.pop("_engine", None)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

