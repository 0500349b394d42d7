"""The JSON report of a segmented slide: what was read, by which model and config, what came out, seconds per
stage. Written last: a report that says complete, with every output it lists at the size it recorded, marks the
slide's outputs complete (`outputs_complete`)."""
from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

from ..naming import output_paths, slide_identity

__all__ = ["REPORT_FORMAT", "slide_report", "outputs_complete", "peak_rss_mb", "OUTPUT_KEYS"]

REPORT_FORMAT = "fastgicn-segment-report-1"
OUTPUT_KEYS = ("probability", "mask", "geojson", "overlay")  # the files a report lists (the report is the fifth)


def peak_rss_mb() -> float | None:
    """Peak resident memory of this process so far, in MiB (Linux and macOS)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)


def slide_report(*, src, stem: str, level, model, weights, model_fp, config, stitch: str, device, threads: int,
                 candidates: int, batches, stitcher, tumour_px: int, regions: dict, tissue, tissue_l0_px: int,
                 dice, out_mpp, summary_downsample: int, started: str, fingerprint, paths: dict,
                 timings: dict, version: str) -> dict:
    """The report's dict from the stages' pieces: the open slide `src` and the `level` read, the `batches` ring
    (its stats), the `stitcher`, the tumour pixel count and GeoJSON region counts, the `tissue` mask, the `dice`
    sink (or None), the output `paths` (written: their sizes are recorded) and the `timings` so far."""
    import torch

    path = getattr(src, "path", None)
    n_read = batches.stats.tiles_read
    n_rejected = batches.stats.tiles_rejected
    report = {
        "format": REPORT_FORMAT,
        "complete": True,
        "fingerprint": fingerprint,
        "slide": {"path": str(Path(path).resolve()) if path else None,
                  "name": stem, "vendor": getattr(src, "vendor", None), "dimensions": list(src.dimensions),
                  "level_count": src.level_count, "mpp": src.mpp,
                  "identity": slide_identity(path) if path else None},
        "read": {**level.to_dict(src.mpp), "reader": getattr(src, "reader", None),
                 "reader_note": getattr(src, "reader_note", None)},
        "model": {"name": getattr(model, "model_name", type(model).__name__),
                  "kwargs": getattr(model, "model_kwargs", {}), "weights": None if weights is None else
                  str(weights), "fingerprint": model_fp},
        "config": config.to_dict(),
        "stitch": stitch,
        "device": str(device),
        "tiles": {"candidates": int(candidates), "read": n_read, "rejected": n_rejected,
                  "segmented": n_read - n_rejected, "threads": threads, "ring_slots": batches.n_slots,
                  "ring_bytes": batches.stats.ring_bytes, "pinned": batches.pinned},
        "tumour": {"pixels": tumour_px, "area_mm2": None if out_mpp is None else tumour_px * out_mpp ** 2 / 1e6,
                   "regions": regions.pop("kept"), "small_regions_dropped": regions},
        "tissue": {"pixels_level0": tissue_l0_px, "mask_downsample": tissue.downsample,
                   "area_mm2": None if src.mpp is None else tissue_l0_px * src.mpp ** 2 / 1e6},
        "dice": None if dice is None else dice.result(),
        "memory": {"stitch_band_rows_peak": stitcher.peak_band_rows, "summary_downsample": summary_downsample,
                   "peak_rss_mb": peak_rss_mb()},
        "seconds": None,
        "tiles_per_second": None,
        "started": started,
        "versions": {"fastgicn": version, "torch": torch.__version__, "numpy": np.__version__,
                     "python": platform.python_version()},
        "outputs": {},
    }
    report["tissue"]["found"] = report["tiles"]["segmented"] > 0  # no tissue: empty outputs, a warning
    for key in OUTPUT_KEYS:
        report["outputs"][key] = {"file": paths[key].name, "bytes": paths[key].stat().st_size}
    report["seconds"] = {k: round(v, 4) for k, v in timings.items()}
    report["tiles_per_second"] = round(n_read / max(timings["segment_loop"], 1e-9), 2)
    report["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    return report


def outputs_complete(out_dir, stem: str, fingerprint: str | None = None) -> bool:
    """True when the report of `stem` exists, says complete, matches `fingerprint` (if given) and every
    output it lists is present with the size it recorded."""
    paths = output_paths(out_dir, stem)
    try:
        report = json.loads(paths["report"].read_text())
    except (OSError, ValueError):
        return False
    if report.get("format") != REPORT_FORMAT or not report.get("complete"):
        return False
    if fingerprint is not None and report.get("fingerprint") != fingerprint:
        return False
    for info in report.get("outputs", {}).values():
        p = Path(out_dir) / info["file"]
        try:
            if p.stat().st_size != info["bytes"]:
                return False
        except OSError:
            return False
    return True
