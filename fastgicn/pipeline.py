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
slide whose report says it is complete for the same model, config and slide content is skipped, another slide
under the same name is refused, a bad slide is reported and skipped (and listed in the failure manifest), and a
run killed midway resumes with the first incomplete slide. A slide is a `SlideJob` in three phases (prepare,
run, finish) so that the next slide is opened and its first batches read while this one runs, and this one's
outputs are finished while the next one runs: the device does not wait between slides (`fastgicn.distributed`
runs the same jobs in one Ray actor per GPU).
"""
from __future__ import annotations

import os
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .cohort import ensure_out_dir, model_fingerprint, plan_slide, write_failures
from .config import TileConfig
from .engine.base import resolve_device
from .engine.runner import TUMOUR_CLASS, DeviceRunner  # noqa: F401 (TUMOUR_CLASS: re-exported)
from .errors import ConfigError, FastGicnError
from .naming import OUTPUT_SUFFIXES, output_paths, slide_stem  # noqa: F401 (re-exported)
from .outputs.dice import TruthDice
from .outputs.atomic import remove_partials, write_json
from .outputs.lowres import LowRes, lowres_factor
from .outputs.overlay import write_slide_overlay
from .outputs.polygons import (DEFAULT_MIN_REGION_PIXELS, DEFAULT_MIN_REGION_UM2, min_region_area, tumour_geojson,
                               write_geojson)
from .outputs.report import REPORT_FORMAT, outputs_complete, slide_report  # noqa: F401 (re-exported)
from .outputs.tiff import PyramidBandWriter
from .progress import Progress
from .tiling.batches import BatchRing
from .tiling.stitch import Stitcher
from .tiling.stitch_thread import StitchThread

__all__ = ["segment_slide", "segment_slides", "SlideJob", "SlideResult", "output_paths", "outputs_complete"]


@dataclass
class SlideResult:
    slide: str
    status: str  # "done", "skipped" (complete outputs already there) or "failed"
    outputs: dict = field(default_factory=dict)
    report: dict | None = None
    error: str | None = None
    # wall times (time.time()) the first batch went to the model and the last came back
    forward_window: tuple | None = None


def segment_slide(slide, out_dir, model, config: TileConfig | None = None, device="cpu", *, truth=None,
                  stitch: str = "blend", threads: int | None = None, ring: int | None = None, handles: str = "shared",
                  mpp: float | None = None, name: str | None = None, progress: bool | None = None,
                  summary_max_side: int = 4096, overlay_max_side: int = 2048, tiff_tile: int = 512,
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
    job = SlideJob(slide, out_dir, model, config, device, truth=truth, stitch=stitch, threads=threads,
                   ring=ring, handles=handles, mpp=mpp, name=name, progress=progress,
                   summary_max_side=summary_max_side, overlay_max_side=overlay_max_side, tiff_tile=tiff_tile,
                   min_region_um2=min_region_um2, min_region_pixels=min_region_pixels, weights=weights,
                   fingerprint=fingerprint, model_fp=model_fp)
    job.prepare()
    job.run()
    return job.finish()


def clear_outputs(out_dir, stem: str) -> None:
    """Remove the outputs of slide `stem` and the temporaries a killed run left, the report (the mark of
    completion) first."""
    paths = output_paths(out_dir, stem)
    for p in [paths["report"]] + [p for k, p in paths.items() if k != "report"]:
        p.unlink(missing_ok=True)
        remove_partials(out_dir, p.name)


class SlideJob:
    """One slide in three phases, so that slides can overlap on one device (`segment_slides`, the Ray
    workers) and leave it no idle gap between them:

    - `prepare()` (any thread): remove what a killed run left, open the slide, tissue mask, candidate tiles,
      the output writers, and start the reader threads, which fill the batch ring and then wait;
    - `run()` (the thread that owns the device, one job at a time): the device loop, batches -> stitch thread;
    - `finish()` (any thread, while the next job runs): the stitch tail, the TIFFs, polygons, overlay, and the
      report, last. Returns the SlideResult.

    An exception in a phase, or `abort()`, removes the partial outputs and joins the job's threads.
    `forward_window` is (wall time the first batch went to the model, wall time the last came back) and
    `tiles_done` counts tiles as they come back: what the Ray progress and bench/bench_cluster.py read.
    """

    def __init__(self, slide, out_dir, model, config: TileConfig | None = None, device="cpu", *, truth=None,
                 stitch: str = "blend", threads: int | None = None, ring: int | None = None,
                 handles: str = "shared", mpp: float | None = None, name: str | None = None,
                 progress: bool | None = None, summary_max_side: int = 4096, overlay_max_side: int = 2048,
                 tiff_tile: int = 512, min_region_um2: float = DEFAULT_MIN_REGION_UM2,
                 min_region_pixels: float = DEFAULT_MIN_REGION_PIXELS, weights=None,
                 fingerprint: str | None = None, model_fp: str | None = None):
        config = config or TileConfig()
        if not isinstance(config, TileConfig):
            raise ConfigError(f"config must be a TileConfig, got {type(config).__name__}")
        if threads is None:
            from .cpus import default_reader_threads

            threads = default_reader_threads()
        if stitch not in ("crop", "blend"):
            raise ConfigError(f"stitch={stitch!r}: use 'crop' or 'blend'")
        min_region_area(None, min_region_um2, min_region_pixels)  # refuse a bad threshold before any work
        self.slide, self.out_dir, self.model, self.config = slide, Path(out_dir), model, config
        self.device = resolve_device(device)
        self.truth, self.stitch, self.threads, self.ring, self.handles = truth, stitch, threads, ring, handles
        self.mpp, self.progress, self.weights = mpp, progress, weights
        self.summary_max_side, self.overlay_max_side = summary_max_side, overlay_max_side
        self.tiff_tile = tiff_tile
        self.min_region_um2, self.min_region_pixels = min_region_um2, min_region_pixels
        self.fingerprint, self.model_fp = fingerprint, model_fp
        self.stem = name or slide_stem(slide)
        self.name = name
        self.paths = output_paths(self.out_dir, self.stem)
        self.timings: dict[str, float] = {}
        self.forward_window: list[float | None] = [None, None]
        self.tiles_done = 0
        self._active = 0.0  # seconds spent in the phases (not waiting for the device between them)
        self._stack = ExitStack()

    def abort(self) -> None:
        """Stop and join the job's threads and remove its partial outputs (idempotent)."""
        self._stack.close()

    @contextmanager
    def _phase(self):
        t0 = self._phase_t0 = time.perf_counter()
        try:
            yield
        except BaseException:
            self.abort()
            raise
        finally:
            self._active += time.perf_counter() - t0

    def prepare(self) -> SlideJob:
        from .tiling.grid import read_resolution_for, tissue_tiles
        from .slide import Slide, open_slide
        from .slide.tissue import tissue_mask

        with self._phase():
            self.started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            self.out_dir.mkdir(parents=True, exist_ok=True)
            clear_outputs(self.out_dir, self.stem)  # what a killed run of this slide may have left
            stack, slide, timings = self._stack, self.slide, self.timings
            t0 = time.perf_counter()
            if isinstance(slide, Slide):  # opened by the caller, who closes it
                src = slide
            else:
                src = open_slide(slide, mpp=self.mpp) if isinstance(slide, np.ndarray) else \
                    open_slide(slide, mpp=self.mpp, handles=self.handles)
                stack.callback(src.close)
            self.src = src
            # a stored level, or a finer one reduced to the target
            self.level = level = read_resolution_for(src, self.config)
            self.ds = ds = float(level.downsample)
            self.width, self.height = width, height = level.dimensions
            self.out_mpp = None if src.mpp is None else src.mpp * ds
            timings["open"] = time.perf_counter() - t0

            t0 = time.perf_counter()
            self.tissue = tissue_mask(src)
            self.candidates = tissue_tiles(src, self.config, mask=self.tissue, read=False)
            self.tissue_l0_px = int(self.tissue.mask.sum()) * self.tissue.downsample ** 2
            timings["tissue"] = time.perf_counter() - t0
            self._open_sinks(width, height)
            config, candidates, ring, t = self.config, self.candidates, self.ring, self.config.tile_size
            lvl_xy = np.rint(candidates[:, :2] / ds).astype(np.int64)
            self.stitcher = Stitcher(lvl_xy, width, height, t, self._sink, mode=self.stitch)
            self.batches = BatchRing(src, candidates, level=level, tile_size=t, batch_size=config.batch_size,
                                     threads=self.threads,
                                     ring=ring, min_tissue_fraction=config.min_tissue_fraction,
                                     white_threshold=config.white_threshold, pin=self.device.type == "cuda")
            stack.callback(self.batches.close)
            self.batches.start()  # the readers fill the ring while another slide may still hold the device
        return self

    def _open_sinks(self, width: int, height: int) -> None:
        """The sinks of the stitched rows: the two pyramid TIFFs, the reduced copy and the Dice counter."""
        from . import __version__

        stack, paths, model = self._stack, self.paths, self.model
        self.factor = lowres_factor(width, height, self.summary_max_side)
        self.summary = LowRes(width, height, self.factor)
        what = f"of {self.stem} by fastgicn {__version__}, {getattr(model, 'model_name', type(model).__name__)}"
        self.prob_writer = PyramidBandWriter(paths["probability"], width, height, mpp=self.out_mpp,
                                             tile=self.tiff_tile, compression="deflate", downsample="mean",
                                             description=f"tumour probability {what} (uint8: 255 is p = 1)")
        stack.callback(self.prob_writer.abort)  # no-op once closed
        self.mask_writer = PyramidBandWriter(paths["mask"], width, height, mpp=self.out_mpp, tile=self.tiff_tile,
                                             compression="deflate", downsample="majority",
                                             description=f"tumour mask {what} (0 normal or glass, 255 tumour)")
        stack.callback(self.mask_writer.abort)
        self.dice = None
        if self.truth is not None:
            self.dice = TruthDice(self.truth, self.src, self.ds, width)
            stack.callback(self.dice.close)
        self.sink_seconds = 0.0
        self._zeros: dict[tuple, np.ndarray] = {}

    def _zero_rows(self, shape: tuple) -> np.ndarray:
        z = self._zeros.get(shape)
        if z is None:
            z = self._zeros[shape] = np.zeros(shape, np.uint8)
            z.flags.writeable = False
        return z

    def _sink(self, y0: int, rows: np.ndarray) -> None:
        from ._tiler import max_count_u8

        s0 = time.perf_counter()
        peak, tumour = max_count_u8(rows, 128)  # one pass, GIL released
        if tumour:
            label = rows >= 128
            label_u8 = label.view(np.uint8) * np.uint8(255)
        elif peak:  # tissue without tumour: the label rows are zeros (one read-only buffer for all)
            label_u8 = self._zero_rows(rows.shape)
            label = label_u8.view(bool)
        else:  # rows of glass between tissue: no need to threshold zeros
            label, label_u8 = rows.view(bool), rows
        # the rows are fresh arrays (or the read-only zeros) that nothing modifies: no copy into the writers;
        # rows known to be uniform (glass; a tumour-free mask) spare the writers and LowRes a pass over them
        self.prob_writer.write_rows(y0, rows, copy=False, value=None if peak else 0)
        self.mask_writer.write_rows(y0, label_u8, copy=False, value=None if tumour else 0)
        self.summary.add(y0, label_u8, blank=not tumour)
        if self.dice is not None:
            self.dice.add(y0, label)
        self.sink_seconds += time.perf_counter() - s0

    def _timed(self, batches):
        for batch in batches:
            if self.forward_window[0] is None:
                self.forward_window[0] = time.time()
            yield batch

    def run(self) -> SlideJob:
        with self._phase():
            stitch_queue = 2  # batches waiting for the stitch thread
            self.runner = runner = DeviceRunner(self.model, self.device, self.config.tile_size, depth=2,
                                                hold=stitch_queue + 2, batch_size=self.config.batch_size)
            bar = Progress(len(self.candidates), self.stem, enabled=self.progress)
            t_loop = time.perf_counter()
            # reader threads -> ring -> device runner (this thread) -> stitch thread -> writers
            self.stitching = stitching = StitchThread(self.stitcher, maxsize=stitch_queue)
            self._stack.callback(stitching.abort)  # joined whatever happens
            results = runner.run(self._timed(self.batches))
            self._stack.callback(results.close)  # an early exit lets in-flight device work land first
            for batch, probs in results:
                self.forward_window[1] = time.time()
                stitching.put(batch.indices, batch.rejected, probs)
                n = len(batch.indices) + len(batch.rejected)
                self.tiles_done += n
                bar.update(n)
            self.batches.close()
            bar.close()
            self.timings["segment_loop"] = time.perf_counter() - t_loop
        return self

    def finish(self) -> SlideResult:
        with self._phase():
            timings, src = self.timings, self.src
            t0 = time.perf_counter()
            self.stitching.close()
            self.stitcher.close()
            stitch_seconds = self.stitching.seconds + time.perf_counter() - t0
            t0 = time.perf_counter()
            self.prob_writer.close()
            self.mask_writer.close()
            timings["finish_tiffs"] = time.perf_counter() - t0
            timings["wait_for_batches"] = self.batches.stats.wait_seconds
            timings.update(self.runner.seconds)
            timings["stitch"] = stitch_seconds - self.sink_seconds
            timings["outputs_streaming"] = self.sink_seconds
            timings["tiff_writer_threads"] = self.prob_writer.seconds + self.mask_writer.seconds
            timings["read_threads"] = self.batches.stats.read_seconds
            timings["read_threads_cpu"] = self.batches.stats.read_cpu_seconds

            # polygons (this thread, strips on the cores) and the overlay (a thread of its own) from the reduced mask
            low = self.summary.result() >= 128  # at least half of the block is tumour
            f, ds = self.factor, self.ds
            with ThreadPoolExecutor(1, thread_name_prefix="fastgicn-overlay") as pool:
                overlay = pool.submit(_timed_call, write_slide_overlay, self.paths["overlay"], src, low, f, ds,
                                      max_side=self.overlay_max_side)
                t0 = time.perf_counter()
                src_path = getattr(src, "path", None)
                collection, regions = tumour_geojson(low, f * ds, clip=tuple(float(v) for v in src.dimensions),
                                                     mpp=src.mpp, min_region_um2=self.min_region_um2,
                                                     min_region_pixels=self.min_region_pixels,
                                                     slide_name=Path(src_path).name if src_path else self.name)
                write_geojson(self.paths["geojson"], collection)
                timings["polygons"] = time.perf_counter() - t0
                timings["overlay"] = overlay.result()

            # seconds in this job's phases, not the wait for the device while another slide held it
            timings["total"] = self._active + time.perf_counter() - self._phase_t0
            report = self._report(regions)
            write_json(self.paths["report"], report)
            self.abort()  # closes the slide; everything else is closed already
        slide = self.slide
        return SlideResult(str(slide) if isinstance(slide, (str, os.PathLike)) else self.stem, "done",
                           {k: str(p) for k, p in self.paths.items()}, report,
                           forward_window=tuple(self.forward_window))

    def _report(self, regions: dict) -> dict:
        from . import __version__

        return slide_report(src=self.src, stem=self.stem, level=self.level, model=self.model,
                            weights=self.weights, model_fp=self.model_fp, config=self.config,
                            stitch=self.stitch, device=self.device, threads=self.threads, candidates=len(self.candidates), batches=self.batches,
                            stitcher=self.stitcher, tumour_px=self.summary.count, regions=regions,
                            tissue=self.tissue, tissue_l0_px=self.tissue_l0_px, dice=self.dice,
                            out_mpp=self.out_mpp, summary_downsample=self.factor, started=self.started,
                            fingerprint=self.fingerprint, paths=self.paths, timings=self.timings,
                            version=__version__)


def fingerprint_options(kwargs: dict) -> dict:
    """The segment options that change an output, for the run fingerprint."""
    keys = ("min_region_um2", "min_region_pixels", "mpp")
    return {k: kwargs.get(k) for k in keys if kwargs.get(k) is not None}


def failure_message(exc: BaseException, slide, out_dir) -> str | None:
    """The one line a slide that failed is reported with, for what a bad slide or a full disk raise; None for
    anything else (a bug, an interrupt), which stops the run."""
    if isinstance(exc, FastGicnError):
        return str(exc)
    if isinstance(exc, OSError):  # e.g. a full disk while writing this slide's outputs: the others may still fit
        return (f"writing the outputs of {slide} in {out_dir} failed ({exc.strerror or exc}"
                f"{': ' + str(exc.filename) if exc.filename else ''}): free disk space or choose another -o")
    return None


def done_lines(label: str, slide, rep: dict) -> list[str]:
    """The log lines of a segmented slide: tiles, speed, tumour, Dice; a warning when it had no tissue."""
    extra = f", Dice {rep['dice']['dice']:.4f}" if rep.get("dice") else ""
    area = rep["tumour"]["area_mm2"]
    tumour = f"{area:.3f} mm²" if area is not None else f"{rep['tumour']['pixels']} px"
    lines = [(f"{label}: {rep['tiles']['segmented']} tiles in {rep['seconds']['total']:.1f} s "
              f"({rep['tiles_per_second']:.1f} tiles/s), tumour {tumour}{extra}")]
    if not rep["tissue"].get("found", True):
        lines.append(f"{label}: warning: no tissue found in {slide}: empty outputs written (the report says "
                     "tissue.found = false); check the slide, or lower --min-tissue-fraction / --white-threshold")
    return lines


def check_cohort(slides, truths, out_dir) -> tuple[list, list, list[str]]:
    """(slides, truths, stems) once checked: one truth (or None) per slide, no two slides under one name."""
    slides = list(slides)
    truths = [None] * len(slides) if truths is None else list(truths)
    if len(truths) != len(slides):
        raise ConfigError(f"{len(slides)} slides but {len(truths)} truth masks: give one per slide (or none)")
    stems = [slide_stem(s) for s in slides]
    dup = sorted({s for s in stems if stems.count(s) > 1})
    if dup:
        raise ConfigError(f"slides {dup} would write outputs under the same name in {out_dir}: segment them "
                          "into different output directories")
    return slides, truths, stems


def run_summary_line(n: int, seconds: float, results, manifest, out_dir) -> str:
    """The last line of a run: slides done, skipped, failed, and how to retry the failures."""
    counts = {k: sum(r.status == k for r in results) for k in ("done", "skipped", "failed")}
    empty = sum(1 for r in results if r.report and not r.report["tissue"].get("found", True))
    line = (f"{n} slides in {seconds:.1f} s: {counts['done']} done{f' ({empty} without tissue)' if empty else ''}, "
            f"{counts['skipped']} skipped, {counts['failed']} failed")
    if manifest:
        line += f"; failures listed in {manifest} (retry: fastgicn segment --slides-from {manifest} -o {out_dir})"
    return line


def segment_slides(slides, out_dir, model, config: TileConfig | None = None, device="cpu", *, truths=None,
                   stitch: str = "blend", force: bool = False, log=None, overlap: bool = True,
                   **kwargs) -> list[SlideResult]:
    """Segment each of `slides` into `out_dir`, in order, on one device.

    A slide whose outputs are complete for the same model, config, stitch mode and slide content is skipped
    (unless `force`); a different slide whose name would replace another's complete outputs is refused (unless
    `force`); a slide that fails with a fastgicn error (missing, corrupt, unreadable, bad mask) is reported
    through `log` and skipped, and the others go on. A slide with no tissue gets empty outputs and a warning.
    The run ends with a summary line and, when a slide failed, `OUT/fastgicn_failures.tsv` (slide, reason,
    time) for `fastgicn segment --slides-from`. `truths` is None or one mask (or None) per slide.
    With `overlap` (the default) the device does not wait between slides: a `fastgicn-prepare` thread plans
    the next slide, opens it, masks its tissue and starts its readers while this one runs, and a
    `fastgicn-finish` thread finishes this one's outputs while the next one runs; the device loop stays on the
    calling thread (Ctrl-C lands there). `overlap=False`: one slide after the other, nothing ahead.
    KeyboardInterrupt stops the run; finished slides stay finished and the next run resumes.
    """
    config = config or TileConfig()
    log = log or (lambda msg: print(msg, file=sys.stderr))
    slides, truths, stems = check_cohort(slides, truths, out_dir)
    ensure_out_dir(out_dir)
    model_fp = kwargs.pop("model_fp", None) or model_fingerprint(model)
    options = fingerprint_options(kwargs)
    results: list[SlideResult | None] = [None] * len(slides)
    failures: list[tuple[str, str, str]] = []
    labels = [f"[{i + 1}/{len(slides)}] {s}" for i, s in enumerate(slides)]
    t_run = time.perf_counter()

    def fail(i: int, msg: str) -> None:
        log(f"{labels[i]}: error: {msg}; skipped")
        results[i] = SlideResult(str(slides[i]), "failed", error=msg)
        failures.append((str(slides[i]), msg, time.strftime("%Y-%m-%dT%H:%M:%S%z")))

    def settled(i: int, outcome) -> None:
        """Record slide i from a finished `finish()` (a SlideResult or the exception it raised)."""
        if isinstance(outcome, BaseException):
            msg = failure_message(outcome, slides[i], out_dir)
            if msg is None:
                raise outcome
            fail(i, msg)
            return
        for line in done_lines(labels[i], slides[i], outcome.report):
            log(line)
        results[i] = outcome

    def plan_and_prepare(i: int):
        """Slide i planned and, when it is to run, prepared: ("skip" | "fail", why) or ("run", its job)."""
        action, value = plan_slide(out_dir, slides[i], stems[i], truths[i], model_fp, config, stitch, options,
                                   force)
        if action != "run":
            return action, value
        try:
            job = SlideJob(slides[i], out_dir, model, config, device, truth=truths[i], stitch=stitch,
                           fingerprint=value, model_fp=model_fp, **kwargs)
            return "run", job.prepare()  # an exception in prepare has aborted the job
        except Exception as exc:
            msg = failure_message(exc, slides[i], out_dir)
            if msg is None:
                raise
            return "fail", msg

    # one thread plans and prepares the next slide while this thread runs the current one on the device;
    # another finishes the last one's outputs meanwhile (serial without `overlap`)
    prepare_pool = ThreadPoolExecutor(1, thread_name_prefix="fastgicn-prepare") if overlap else None
    finish_pool = ThreadPoolExecutor(1, thread_name_prefix="fastgicn-finish") if overlap else None
    ahead: Future | None = None  # the next slide, planned and prepared
    finishing = None  # (i, the future of its finish): the slide that ran last

    def settle_finishing() -> None:
        nonlocal finishing
        if finishing is not None:
            (i, fut), finishing = finishing, None
            settled(i, fut.exception() or fut.result())

    try:
        for i in range(len(slides)):
            current = ahead if ahead is not None else _call(lambda i=i: plan_and_prepare(i), catch=())
            more = prepare_pool is not None and i + 1 < len(slides)
            ahead = prepare_pool.submit(plan_and_prepare, i + 1) if more else None
            action, value = current.result()
            if action == "skip":
                log(f"{labels[i]}: outputs complete in {out_dir}, skipped (use --force to redo)")
                results[i] = SlideResult(str(slides[i]), "skipped",
                                         {k: str(p) for k, p in output_paths(out_dir, stems[i]).items()})
                continue
            if action == "fail":
                fail(i, value)
                continue
            try:
                value.run()
            except Exception as exc:  # the job is aborted already
                msg = failure_message(exc, slides[i], out_dir)
                if msg is None:
                    raise
                fail(i, msg)
                continue
            settle_finishing()  # the previous slide, finished while this one ran
            finishing = (i, finish_pool.submit(value.finish) if finish_pool else _call(value.finish))
        settle_finishing()
    except BaseException:
        # interrupted (or a bug): the slide prepared ahead is dropped; the one finishing has done its device
        # work and is left to complete, so that its outputs are kept
        if ahead is not None:
            wait([ahead])
            if ahead.exception() is None and ahead.result()[0] == "run":
                ahead.result()[1].abort()
        if finishing is not None:
            wait([finishing[1]])
        raise
    finally:
        for pool in (prepare_pool, finish_pool):
            if pool is not None:
                pool.shutdown(wait=True)
    results = [r for r in results if r is not None]
    manifest = write_failures(out_dir, failures)
    if len(slides) > 1 or failures:
        log(run_summary_line(len(slides), time.perf_counter() - t_run, results, manifest, out_dir))
    return results


def _timed_call(fn, *args, **kwargs) -> float:
    """Seconds `fn(*args, **kwargs)` took (for a stage run on a thread of its own)."""
    t0 = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - t0


def _call(fn, catch=(FastGicnError, OSError)) -> Future:
    """`fn()` run now, its outcome (or one of the `catch` exceptions) held as a future: the serial stand-in
    for a thread pool."""
    fut: Future = Future()
    try:
        fut.set_result(fn())
    except catch as exc:
        fut.set_exception(exc)
    return fut
