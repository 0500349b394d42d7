"""The whole-slide flow: slide file -> tumour probability and mask, polygons, overlay and report.

`segment_slide(slide, out_dir, model, config, device)`:

1. open the slide (`open_slide`: the direct tiled-TIFF reader or OpenSlide), pick the resolution to read
   (`config.level` / `config.target_mpp`: a stored level, or a finer level reduced to the target);
2. tissue mask at low resolution and candidate tiles (`tissue_tiles(..., read=False)`: the grid, prefiltered by
   the mask when `config.tissue_prefilter`);
3. reader threads fill a bounded ring of batches (`BatchRing`), rejecting glass tiles as they read them;
4. the device runner (`fastgicn.engine.runner.DeviceRunner`, the one device loop; a plain module is served as
   the torch backend) takes each batch: with CUDA, H2D on a copy stream, normalisation + forward + tumour
   probability + uint8 on a compute stream, D2H into a pinned ring, two batches in flight and only event
   waits; on CPU one table pass of normalisation into a reused buffer, the forward and a fused quantisation;
5. on a stitch thread (a bounded queue from the main thread, so the runner goes straight back to the device),
   the stitcher crops or blends the overlaps and hands over finished rows, which stream into the pyramidal
   TIFFs (probability, and the label mask: 255 where p(tumour) >= 0.5, the argmax of two classes), a reduced
   copy for polygons and the overlay, the tumour pixel count and the Dice against `truth`;
6. GeoJSON polygons, the overlay PNG and the JSON report (written last: it marks the outputs complete).

Every output is written under a temporary name and renamed. `segment_slides(paths, ...)` runs many slides: a
slide whose report says it is complete for the same model, config and slide file is skipped, a bad slide is
reported and skipped, and a run killed midway resumes with the first incomplete slide.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .config import TileConfig
from .engine.base import resolve_device
from .engine.runner import TUMOUR_CLASS, DeviceRunner  # noqa: F401 (TUMOUR_CLASS: re-exported)
from .errors import ConfigError, FastGicnError
from .tiling.batches import BatchRing
from .outputs.files import LowRes, PyramidBandWriter, lowres_factor, remove_partials, write_json, write_overlay_png
from .outputs.polygons import (DEFAULT_MIN_REGION_PIXELS, DEFAULT_MIN_REGION_UM2, min_region_area, tumour_geojson,
                       write_geojson)
from .tiling.stitch import Stitcher
from .naming import FAILURES_NAME, OUTPUT_SUFFIXES, output_paths, slide_identity, slide_stem  # noqa: F401

REPORT_FORMAT = "fastgicn-segment-report-1"


# ---------------------------------------------------------------------------------------------------
# progress

class Progress:
    """A one-line progress bar on stderr: tiles done, tiles/s, ETA. Redrawn in place on a terminal, printed
    every `interval` seconds as plain lines otherwise; `enabled=False` is silent."""

    def __init__(self, total: int, label: str, enabled: bool | None = None, stream=None, interval: float = 10.0):
        self.stream = stream or sys.stderr
        tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.enabled = tty if enabled is None else enabled
        self.tty = tty
        self.total, self.label, self.done = total, label, 0
        self.t0 = time.perf_counter()
        self._last = 0.0
        self.interval = 0.2 if tty else interval

    def line(self) -> str:
        dt = max(time.perf_counter() - self.t0, 1e-9)
        rate = self.done / dt
        eta = (self.total - self.done) / rate if rate > 0 else float("nan")
        pct = 100.0 * self.done / self.total if self.total else 100.0
        width = 24
        fill = int(width * pct / 100)
        eta_s = "--:--" if math.isnan(eta) else f"{int(eta) // 60:02d}:{int(eta) % 60:02d}"
        return (f"{self.label} [{'#' * fill}{'.' * (width - fill)}] {self.done}/{self.total} tiles "
                f"{pct:5.1f}% {rate:6.1f} tiles/s ETA {eta_s}")

    def update(self, n: int) -> None:
        self.done += n
        if not self.enabled:
            return
        now = time.perf_counter()
        if now - self._last >= self.interval:
            self._last = now
            self.stream.write(("\r" + self.line()) if self.tty else self.line() + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write(("\r" if self.tty else "") + self.line() + "\n")
            self.stream.flush()


# ---------------------------------------------------------------------------------------------------
# Dice against a truth mask, streamed with the rows

class _TruthDice:
    """Counts |pred & truth|, |pred|, |truth| over the stitched rows; truth read from a mask slide at the
    output level (0 normal, > 127 tumour, aligned with the slide's level 0)."""

    CHUNK = 8192

    def __init__(self, truth, slide, downsample: float, width: int):
        from .slide import open_slide

        self.path = truth if not isinstance(truth, np.ndarray) else "array"
        if isinstance(truth, np.ndarray) and truth.ndim == 2:
            truth = np.repeat(truth[:, :, None], 3, axis=2)
        self.reader = open_slide(truth)
        if tuple(self.reader.dimensions) != tuple(slide.dimensions):
            self.reader.close()
            raise ConfigError(f"truth mask {self.path} is {self.reader.dimensions[0]}x{self.reader.dimensions[1]} "
                              f"but the slide is {slide.dimensions[0]}x{slide.dimensions[1]}: the mask must be "
                              "aligned with the slide's level 0")
        from .slide.resolution import resolution_at

        # the mask at the output's resolution: a level at that downsample, or a finer one box-reduced (a
        # 0/255 mask's mean is > 127 where at least half of the block is tumour)
        self.resolution = resolution_at(self.reader, downsample, tolerance=0.01)
        self.level, self.downsample, self.width = self.resolution, self.resolution.downsample, width
        self.inter = self.pred = self.truth = 0

    def add(self, y0: int, label: np.ndarray) -> None:
        n = len(label)
        for x in range(0, self.width, self.CHUNK):
            w = min(self.CHUNK, self.width - x)
            t = self.reader.read_region(int(round(x * self.downsample)), int(round(y0 * self.downsample)),
                                        self.level, w, n)[..., 0] > 127
            p = label[:, x:x + w]
            self.inter += int(np.count_nonzero(p & t))
            self.pred += int(np.count_nonzero(p))
            self.truth += int(np.count_nonzero(t))

    def result(self) -> dict:
        total = self.pred + self.truth
        return {"dice": 1.0 if total == 0 else 2.0 * self.inter / total, "truth": str(self.path),
                "intersection_pixels": self.inter, "predicted_pixels": self.pred, "truth_pixels": self.truth,
                "level": self.resolution.level, "reduction": self.resolution.integer_factor or self.resolution.factor}

    def close(self) -> None:
        self.reader.close()


# ---------------------------------------------------------------------------------------------------
# the model side

def model_fingerprint(model) -> str:
    """sha256 of the model's name, kwargs, normalisation and weights (what makes two runs' outputs equal);
    `model` is a torch module or an engine backend holding one as `.model`."""
    from .engine.base import model_fingerprint as module_fingerprint

    module = model if isinstance(model, torch.nn.Module) else getattr(model, "model", None)
    if not isinstance(module, torch.nn.Module):
        raise ConfigError(f"cannot fingerprint {type(model).__name__}: pass a torch model or an engine backend")
    return module_fingerprint(module)


class _StitchThread:
    """Stitching and output streaming on their own thread, fed by a bounded queue, so the main thread goes
    back to the device runner at once. `put(indices, rejected, probs)` blocks while `maxsize` batches wait
    (back-pressure on the runner); an exception in the thread is raised by the next `put` or by `close`, and
    `close` / `abort` always join it. `probs` must stay valid until the thread has stitched it: the runner is
    built with `hold = maxsize + 2` (queued, one being stitched, one being handed over)."""

    def __init__(self, stitcher: Stitcher, maxsize: int = 2):
        import queue
        import threading

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
        import queue

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


# ---------------------------------------------------------------------------------------------------
# one slide

@dataclass
class SlideResult:
    slide: str
    status: str  # "done", "skipped" (complete outputs already there) or "failed"
    outputs: dict = field(default_factory=dict)
    report: dict | None = None
    error: str | None = None


def ensure_out_dir(out_dir) -> Path:
    """Create the output directory once, up front, or say why it cannot be used."""
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"output directory {out_dir} cannot be created ({exc.strerror or exc}): "
                          "choose another -o") from None
    if not os.access(out_dir, os.W_OK):
        raise ConfigError(f"output directory {out_dir} is not writable: choose another -o")
    return out_dir


def run_fingerprint(slide, model_fp: str, config: TileConfig, stitch: str, truth=None, options=None) -> str:
    """What decides whether existing outputs can be kept: model, config, stitch mode, slide and truth contents,
    and the `options` that change an output (the GeoJSON's minimum region, the MPP given)."""
    h = hashlib.sha256()
    parts = {"model": model_fp, "config": config.to_dict(), "stitch": stitch, "format": REPORT_FORMAT,
             "slide": _content(slide), "truth": None if truth is None else _content(truth),
             "options": options or {}}
    h.update(json.dumps(parts, sort_keys=True, default=str).encode())
    return h.hexdigest()


def _content(path) -> str | None:
    """A file's content identity (not its path or time: a copied or moved slide is the same slide)."""
    ident = slide_identity(path)
    return None if ident is None else f"{ident['bytes']}:{ident['content']}"


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


def segment_slide(slide, out_dir, model, config: TileConfig | None = None, device="cpu", *, truth=None,
                  stitch: str = "blend", threads: int | None = None, ring: int | None = None, handles: str = "shared",
                  mpp: float | None = None, name: str | None = None, progress: bool | None = None,
                  summary_max_side: int = 4096, overlay_max_side: int = 2048, tiff_tile: int = 256,
                  min_region_um2: float = DEFAULT_MIN_REGION_UM2,
                  min_region_pixels: float = DEFAULT_MIN_REGION_PIXELS, weights=None,
                  fingerprint: str | None = None, model_fp: str | None = None) -> SlideResult:
    """Segment one slide (a path, an H x W x 3 uint8 array, or a `Slide` the caller opened and closes) into
    `out_dir`; outputs are named after the file, or `name`.

    `model`: a torch module from `create_model` / `model_from_checkpoint` (or an engine backend); `config`:
    the TileConfig (default: the checkpoint's habit, 512-pixel tiles); `truth`: a ground-truth mask (file or
    array, 0 normal / 255 tumour, aligned with level 0) for Dice in the report; `stitch`: "blend" (default:
    no seam with the real network, see tests/test_pipeline.py) or "crop" (half the band memory: 1 byte a
    pixel instead of 2);
    `threads` reader threads (None: `fastgicn.cpus.default_reader_threads()`, the usable cores up to 16), `ring`
    batch slots, `handles` "shared" or "per_thread" OpenSlide handles;
    `summary_max_side` the longest side of the reduced mask that polygons and the overlay come from (the
    full-resolution mask is in the TIFF); `min_region_um2`: tumour regions smaller than this are left out of
    the GeoJSON (not the masks; default 100 um^2, about one tumour cell), or, on a slide without MPP, those
    under `min_region_pixels` level-0 pixels (1600: 100 um^2 at 0.25 um/px); the report says which rule ran
    and what it dropped. Returns a SlideResult whose `report` is what the JSON report holds.
    Raises SlideError / ConfigError naming the file or value at fault; partial outputs are removed.
    """
    from . import __version__
    from .tiling.grid import read_resolution_for, tissue_tiles
    from .slide import Slide, open_slide
    from .slide.tissue import tissue_mask

    config = config or TileConfig()
    if not isinstance(config, TileConfig):
        raise ConfigError(f"config must be a TileConfig, got {type(config).__name__}")
    if threads is None:
        from .cpus import default_reader_threads

        threads = default_reader_threads()
    if stitch not in ("crop", "blend"):
        raise ConfigError(f"stitch={stitch!r}: use 'crop' or 'blend'")
    min_region_area(None, min_region_um2, min_region_pixels)  # refuse a bad threshold before any work
    device = resolve_device(device)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = name or slide_stem(slide)
    paths = output_paths(out_dir, stem)
    timings: dict[str, float] = {}
    t_start = time.perf_counter()
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")

    # a previous run of this slide may have been killed: its temporaries and unconfirmed outputs go
    for p in [paths["report"]] + [p for k, p in paths.items() if k != "report"]:
        p.unlink(missing_ok=True)
        remove_partials(out_dir, p.name)

    with ExitStack() as stack:
        t0 = time.perf_counter()
        if isinstance(slide, Slide):  # opened by the caller, who closes it
            src = slide
        else:
            src = open_slide(slide, mpp=mpp, handles=handles) if not isinstance(slide, np.ndarray) else \
                open_slide(slide, mpp=mpp)
            stack.callback(src.close)
        level = read_resolution_for(src, config)  # a stored level, or a finer one reduced to the target
        ds = float(level.downsample)
        width, height = level.dimensions
        out_mpp = None if src.mpp is None else src.mpp * ds
        timings["open"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        tissue = tissue_mask(src)
        candidates = tissue_tiles(src, config, mask=tissue, read=False)
        tissue_l0_px = int(tissue.mask.sum()) * tissue.downsample ** 2
        timings["tissue"] = time.perf_counter() - t0

        t = config.tile_size
        lvl_xy = np.rint(candidates[:, :2] / ds).astype(np.int64)
        stitch_queue = 2  # batches waiting for the stitch thread
        runner = DeviceRunner(model, device, t, depth=2, hold=stitch_queue + 2, batch_size=config.batch_size)

        # sinks of the stitched rows
        f = lowres_factor(width, height, summary_max_side)
        summary = LowRes(width, height, f)
        what = f"of {stem} by fastgicn {__version__}, {getattr(model, 'model_name', type(model).__name__)}"
        prob_writer = PyramidBandWriter(paths["probability"], width, height, mpp=out_mpp, tile=tiff_tile,
                                        compression="deflate", downsample="mean",
                                        description=f"tumour probability {what} (uint8: 255 is p = 1)")
        stack.callback(prob_writer.abort)  # no-op once closed
        mask_writer = PyramidBandWriter(paths["mask"], width, height, mpp=out_mpp, tile=tiff_tile,
                                        compression="deflate", downsample="majority",
                                        description=f"tumour mask {what} (0 normal or glass, 255 tumour)")
        stack.callback(mask_writer.abort)
        dice = None
        if truth is not None:
            dice = _TruthDice(truth, src, ds, width)
            stack.callback(dice.close)
        sink_seconds = [0.0]

        def sink(y0: int, rows: np.ndarray) -> None:
            s0 = time.perf_counter()
            if rows.any():
                label = rows >= 128
                label_u8 = label.view(np.uint8) * np.uint8(255)
            else:  # rows of glass between tissue: no need to threshold zeros
                label, label_u8 = rows.view(bool), rows
            prob_writer.write_rows(y0, rows)
            mask_writer.write_rows(y0, label_u8)
            summary.add(y0, label_u8)
            if dice is not None:
                dice.add(y0, label)
            sink_seconds[0] += time.perf_counter() - s0

        stitcher = Stitcher(lvl_xy, width, height, t, sink, mode=stitch)
        bar = Progress(len(candidates), stem, enabled=progress)
        batches = BatchRing(src, candidates, level=level, tile_size=t, batch_size=config.batch_size,
                            threads=threads, ring=ring, min_tissue_fraction=config.min_tissue_fraction,
                            white_threshold=config.white_threshold, pin=device.type == "cuda")
        t_loop = time.perf_counter()
        # reader threads -> ring -> device runner (main thread) -> stitch thread -> writers
        with batches:
            stitching = _StitchThread(stitcher, maxsize=stitch_queue)
            stack.callback(stitching.abort)  # joined whatever happens
            results = runner.run(batches)
            stack.callback(results.close)  # an early exit lets in-flight device work land first
            for batch, probs in results:
                stitching.put(batch.indices, batch.rejected, probs)
                bar.update(len(batch.indices) + len(batch.rejected))
            stitching.close()
        bar.close()
        timings["segment_loop"] = time.perf_counter() - t_loop
        t0 = time.perf_counter()
        stitcher.close()
        stitch_seconds = stitching.seconds + time.perf_counter() - t0
        t0 = time.perf_counter()
        prob_writer.close()
        mask_writer.close()
        timings["finish_tiffs"] = time.perf_counter() - t0
        timings["wait_for_batches"] = batches.stats.wait_seconds
        timings.update(runner.seconds)
        timings["stitch"] = stitch_seconds - sink_seconds[0]
        timings["outputs_streaming"] = sink_seconds[0]
        timings["tiff_writer_threads"] = prob_writer.seconds + mask_writer.seconds
        timings["read_threads"] = batches.stats.read_seconds

        # polygons and overlay from the reduced mask
        t0 = time.perf_counter()
        low = summary.result() >= 128  # at least half of the block is tumour
        src_path = getattr(src, "path", None)
        collection, regions = tumour_geojson(low, f * ds, clip=tuple(float(v) for v in src.dimensions),
                                             mpp=src.mpp, min_region_um2=min_region_um2,
                                             min_region_pixels=min_region_pixels,
                                             slide_name=Path(src_path).name if src_path else name)
        write_geojson(paths["geojson"], collection)
        timings["polygons"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        k = 1
        while max(low.shape) / k > overlay_max_side:
            k *= 2
        small = _block_majority(low, k)
        thumb = src.downsampled(max(1, int(round(f * k * ds))))
        if thumb.shape[:2] != small.shape:
            from PIL import Image
            thumb = np.asarray(Image.fromarray(thumb).resize((small.shape[1], small.shape[0]), Image.BOX))
        write_overlay_png(paths["overlay"], thumb, small, max_side=overlay_max_side)
        timings["overlay"] = time.perf_counter() - t0

        tumour_px = summary.count
        n_read = batches.stats.tiles_read
        n_rejected = batches.stats.tiles_rejected
        report = {
            "format": REPORT_FORMAT,
            "complete": True,
            "fingerprint": fingerprint,
            "slide": {"path": str(Path(src.path).resolve()) if getattr(src, "path", None) else None,
                      "name": stem, "vendor": getattr(src, "vendor", None), "dimensions": list(src.dimensions),
                      "level_count": src.level_count, "mpp": src.mpp,
                      "identity": slide_identity(src.path) if getattr(src, "path", None) else None},
            "read": {**level.to_dict(src.mpp), "reader": getattr(src, "reader", None),
                     "reader_note": getattr(src, "reader_note", None)},
            "model": {"name": getattr(model, "model_name", type(model).__name__),
                      "kwargs": getattr(model, "model_kwargs", {}), "weights": None if weights is None else
                      str(weights), "fingerprint": model_fp},
            "config": config.to_dict(),
            "stitch": stitch,
            "device": str(device),
            "tiles": {"candidates": int(len(candidates)), "read": n_read, "rejected": n_rejected,
                      "segmented": n_read - n_rejected, "threads": threads, "ring_slots": batches.n_slots,
                      "ring_bytes": batches.stats.ring_bytes, "pinned": batches.pinned},
            "tumour": {"pixels": tumour_px, "area_mm2": None if out_mpp is None else tumour_px * out_mpp ** 2 / 1e6,
                       "regions": regions.pop("kept"), "small_regions_dropped": regions},
            "tissue": {"pixels_level0": tissue_l0_px, "mask_downsample": tissue.downsample,
                       "area_mm2": None if src.mpp is None else tissue_l0_px * src.mpp ** 2 / 1e6},
            "dice": None if dice is None else dice.result(),
            "memory": {"stitch_band_rows_peak": stitcher.peak_band_rows, "summary_downsample": f,
                       "peak_rss_mb": peak_rss_mb()},
            "seconds": None,
            "tiles_per_second": None,
            "started": started,
            "versions": {"fastgicn": __version__, "torch": torch.__version__, "numpy": np.__version__,
                         "python": platform.python_version()},
            "outputs": {},
        }
        report["tissue"]["found"] = report["tiles"]["segmented"] > 0  # no tissue: empty outputs, a warning
        for key in ("probability", "mask", "geojson", "overlay"):
            report["outputs"][key] = {"file": paths[key].name, "bytes": paths[key].stat().st_size}
        timings["total"] = time.perf_counter() - t_start
        report["seconds"] = {k: round(v, 4) for k, v in timings.items()}
        report["tiles_per_second"] = round(n_read / max(timings["segment_loop"], 1e-9), 2)
        report["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        write_json(paths["report"], report)
    return SlideResult(str(slide) if isinstance(slide, (str, os.PathLike)) else stem, "done",
                       {k: str(p) for k, p in paths.items()}, report)


def _block_majority(mask: np.ndarray, k: int) -> np.ndarray:
    """k x k blocks of a bool mask -> True where at least half of the block's pixels (edge blocks: of the
    pixels they have) are set. One block row at a time, so temporaries stay small."""
    if k == 1:
        return mask
    h, w = mask.shape
    cols = np.arange(0, w, k)
    col_counts = np.diff(np.append(cols, w))
    out = np.empty((len(range(0, h, k)), len(cols)), bool)
    for i, r in enumerate(range(0, h, k)):
        band = mask[r:r + k]
        sums = np.add.reduceat(band.sum(axis=0, dtype=np.int32), cols)
        out[i] = 2 * sums >= col_counts * len(band)
    return out


def peak_rss_mb() -> float | None:
    """Peak resident memory of this process so far, in MiB (Linux and macOS)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)


# ---------------------------------------------------------------------------------------------------
# the demo: a synthetic slide and the shipped demo weights

DEMO_WEIGHTS = Path(__file__).resolve().parent.parent / "weights" / "demo_synthetic.pt"
DEMO_SLIDE_NAME = "synthetic_demo.svs"
DEMO_SIZE = (28000, 28000)  # ~1,700 tissue tiles: about a minute on 2 CPU cores with the demo weights (28-43 tiles/s)


def demo_slide(out_dir, size: tuple[int, int] = DEMO_SIZE, seed: int = 0, log=None) -> tuple[Path, Path]:
    """OUT_DIR/synthetic_demo.svs and its ground-truth mask, made once and reused while both exist (the
    writer renames complete files into place, so an existing file is a complete one). A different size or
    seed than the existing one makes a new slide named after them."""
    from .synth import write_synthetic_slide

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = DEMO_SLIDE_NAME if (tuple(size), seed) == (DEMO_SIZE, 0) else \
        f"synthetic_demo_{size[0]}x{size[1]}_seed{seed}.svs"
    slide = out_dir / name
    mask = slide.with_name(slide.stem + ".mask.tif")
    if slide.is_file() and mask.is_file():
        return slide, mask
    for p in (slide, mask):  # what a killed run left half-written
        remove_partials(out_dir, p.name)
    if log:
        log(f"making a synthetic slide {slide} ({size[0]} x {size[1]} pixels, seed {seed}) and its mask")
    return write_synthetic_slide(slide, size[0], size[1], seed=seed)


def load_model(weights=None, device="cpu"):
    """(model, checkpoint payload) from `weights`, or from the shipped demo weights when None."""
    from .train import load_checkpoint, model_from_checkpoint

    path = Path(weights) if weights is not None else DEMO_WEIGHTS
    if weights is None and not path.is_file():
        raise ConfigError(f"no --weights given and the demo weights {path} are not installed: pass a checkpoint "
                          "written by `fastgicn train`, or reinstall fastgicn with its weights")
    device = resolve_device(device)  # a bad --device is refused before the checkpoint is read
    payload = load_checkpoint(path)
    return model_from_checkpoint(payload, device), payload, path


# ---------------------------------------------------------------------------------------------------
# many slides

def existing_slide(out_dir, stem: str) -> dict | None:
    """The identity of the slide whose complete outputs are under `stem` in `out_dir` (None if there are none)."""
    try:
        report = json.loads(output_paths(out_dir, stem)["report"].read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(report, dict) or not report.get("complete"):
        return None
    slide = report.get("slide") or {}
    return slide.get("identity") or {"path": slide.get("path"), "content": None}


def _other_slide(out_dir, stem: str, slide) -> str | None:
    """Why `slide` must not write over the complete outputs of a different slide under the same name, or None."""
    there = existing_slide(out_dir, stem)
    here = slide_identity(slide)
    if there is None or here is None or there.get("content") == here["content"]:
        return None
    return (f"{output_paths(out_dir, stem)['report']} holds the complete results of another slide named "
            f"{stem} ({there.get('path')}); segmenting {here['path']} would replace them: give it another -o, "
            "or --force to replace them")


def write_failures(out_dir, failures: list[tuple[str, str, str]]) -> Path | None:
    """The failure manifest beside the outputs (slide, reason, time; tab-separated, a header line), or no
    manifest when nothing failed. `fastgicn segment --slides-from` reads its first column back."""
    path = Path(out_dir) / FAILURES_NAME
    if not failures:
        path.unlink(missing_ok=True)
        return None
    lines = ["# slide\treason\ttime: retry with fastgicn segment --slides-from " + str(path)]
    lines += ["\t".join(v.replace("\t", " ").replace("\n", " ") for v in row) for row in failures]
    from .outputs.files import atomic_path

    with atomic_path(path) as tmp:
        Path(tmp).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def segment_slides(slides, out_dir, model, config: TileConfig | None = None, device="cpu", *, truths=None,
                   stitch: str = "blend", force: bool = False, log=None, **kwargs) -> list[SlideResult]:
    """Segment each of `slides` into `out_dir`, one after the other.

    A slide whose outputs are complete for the same model, config, stitch mode and slide content is skipped
    (unless `force`); a different slide whose name would replace another's complete outputs is refused (unless
    `force`); a slide that fails with a fastgicn error (missing, corrupt, unreadable, bad mask) is reported
    through `log` and skipped, and the others go on. A slide with no tissue gets empty outputs and a warning.
    The run ends with a summary line and, when a slide failed, `OUT/fastgicn_failures.tsv` (slide, reason,
    time) for `fastgicn segment --slides-from`. `truths` is None or one mask (or None) per slide.
    KeyboardInterrupt stops the run; finished slides stay finished and the next run resumes.
    """
    config = config or TileConfig()
    log = log or (lambda msg: print(msg, file=sys.stderr))
    slides = list(slides)
    truths = [None] * len(slides) if truths is None else list(truths)
    if len(truths) != len(slides):
        raise ConfigError(f"{len(slides)} slides but {len(truths)} truth masks: give one per slide (or none)")
    stems = [slide_stem(s) for s in slides]
    dup = sorted({s for s in stems if stems.count(s) > 1})
    if dup:
        raise ConfigError(f"slides {dup} would write outputs under the same name in {out_dir}: segment them "
                          "into different output directories")
    ensure_out_dir(out_dir)
    model_fp = kwargs.pop("model_fp", None) or model_fingerprint(model)
    results: list[SlideResult] = []
    failures: list[tuple[str, str, str]] = []
    t_run = time.perf_counter()

    def fail(label: str, slide, msg: str) -> None:
        log(f"{label}: error: {msg}; skipped")
        results.append(SlideResult(str(slide), "failed", error=msg))
        failures.append((str(slide), msg, time.strftime("%Y-%m-%dT%H:%M:%S%z")))

    for i, (slide, truth) in enumerate(zip(slides, truths)):
        label = f"[{i + 1}/{len(slides)}] {slide}"
        try:
            fp = run_fingerprint(slide, model_fp, config, stitch, truth,
                                 {k: kwargs.get(k) for k in ("min_region_um2", "min_region_pixels", "mpp")
                                  if kwargs.get(k) is not None})
        except OSError as exc:
            what = "truth mask" if truth is not None and str(exc.filename) == str(truth) else "slide"
            fail(label, slide, f"{what} {exc.filename or slide} cannot be read ({exc.strerror or exc}): check the path")
            continue
        if not force and outputs_complete(out_dir, stems[i], fp):
            log(f"{label}: outputs complete in {out_dir}, skipped (use --force to redo)")
            results.append(SlideResult(str(slide), "skipped",
                                       {k: str(p) for k, p in output_paths(out_dir, stems[i]).items()}))
            continue
        clash = None if force else _other_slide(out_dir, stems[i], slide)
        if clash:
            fail(label, slide, clash)
            continue
        try:
            res = segment_slide(slide, out_dir, model, config, device, truth=truth, stitch=stitch,
                                fingerprint=fp, model_fp=model_fp, **kwargs)
        except FastGicnError as exc:
            fail(label, slide, str(exc))
            continue
        except OSError as exc:  # e.g. a full disk while writing this slide's outputs: the others may still fit
            fail(label, slide, f"writing the outputs of {slide} in {out_dir} failed ({exc.strerror or exc}"
                 f"{': ' + str(exc.filename) if exc.filename else ''}): free disk space or choose another -o")
            continue
        rep = res.report
        extra = f", Dice {rep['dice']['dice']:.4f}" if rep.get("dice") else ""
        area = rep["tumour"]["area_mm2"]
        tumour = f"{area:.3f} mm²" if area is not None else f"{rep['tumour']['pixels']} px"
        log(f"{label}: {rep['tiles']['segmented']} tiles in {rep['seconds']['total']:.1f} s "
            f"({rep['tiles_per_second']:.1f} tiles/s), tumour {tumour}{extra}")
        if not rep["tissue"].get("found", True):
            log(f"{label}: warning: no tissue found in {slide}: empty outputs written (the report says "
                "tissue.found = false); check the slide, or lower --min-tissue-fraction / --white-threshold")
        results.append(res)
    counts = {k: sum(r.status == k for r in results) for k in ("done", "skipped", "failed")}
    empty = sum(1 for r in results if r.report and not r.report["tissue"].get("found", True))
    manifest = write_failures(out_dir, failures)
    if len(slides) > 1 or failures:
        summary = (f"{len(slides)} slides in {time.perf_counter() - t_run:.1f} s: {counts['done']} done"
                   f"{f' ({empty} without tissue)' if empty else ''}, {counts['skipped']} skipped, "
                   f"{counts['failed']} failed")
        if manifest:
            summary += f"; failures listed in {manifest} (retry: fastgicn segment --slides-from {manifest} -o {out_dir})"
        log(summary)
    return results
