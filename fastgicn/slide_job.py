"""One slide through the flow, in three phases: slide file -> tumour probability and mask, polygons, overlay
and report.

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
6. GeoJSON polygons (strips traced on the cores) beside the overlay PNG (a thread of its own), and the JSON
   report, written last: it marks the outputs complete.

Steps 1-3 are `SlideJob.prepare`, 4-5 `run`, the tail of 5 and 6 `finish`. Every output is written under a
temporary name and renamed.
"""
from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .config import TileConfig
from .engine.base import resolve_device
from .engine.runner import DeviceRunner
from .errors import ConfigError
from .naming import output_paths, slide_stem
from .outputs.atomic import remove_partials, write_json
from .outputs.dice import TruthDice
from .outputs.lowres import LowRes, lowres_factor
from .outputs.overlay import write_slide_overlay
from .outputs.geojson import tumour_geojson, write_geojson
from .outputs.polygons import DEFAULT_MIN_REGION_PIXELS, DEFAULT_MIN_REGION_UM2, min_region_area
from .outputs.report import slide_report
from .outputs.tiff import PyramidBandWriter
from .progress import Progress
from .tiling.batches import BatchRing
from .tiling.stitch import Stitcher
from .tiling.stitch_thread import StitchThread

__all__ = ["SlideJob", "SlideResult", "clear_outputs"]


@dataclass
class SlideResult:
    slide: str
    status: str  # "done", "skipped" (complete outputs already there) or "failed"
    outputs: dict = field(default_factory=dict)
    report: dict | None = None
    error: str | None = None
    # wall times (time.time()) the first batch went to the model and the last came back
    forward_window: tuple | None = None


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

            # polygons (here, strips on the cores) beside the overlay (its own thread), from the reduced mask
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


def _timed_call(fn, *args, **kwargs) -> float:
    """Seconds `fn(*args, **kwargs)` took (for a stage run on a thread of its own)."""
    t0 = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - t0
