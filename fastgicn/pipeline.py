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
run killed midway resumes with the first incomplete slide.
"""
from __future__ import annotations

import os
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .cohort import ensure_out_dir, model_fingerprint, other_slide, run_fingerprint, write_failures
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

__all__ = ["segment_slide", "segment_slides", "SlideResult", "output_paths", "outputs_complete"]


@dataclass
class SlideResult:
    slide: str
    status: str  # "done", "skipped" (complete outputs already there) or "failed"
    outputs: dict = field(default_factory=dict)
    report: dict | None = None
    error: str | None = None


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
    from ._tiler import max_count_u8

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
            dice = TruthDice(truth, src, ds, width)
            stack.callback(dice.close)
        sink_seconds = [0.0]
        zeros: dict[tuple, np.ndarray] = {}

        def _zeros(shape: tuple) -> np.ndarray:
            z = zeros.get(shape)
            if z is None:
                z = zeros[shape] = np.zeros(shape, np.uint8)
                z.flags.writeable = False
            return z

        def sink(y0: int, rows: np.ndarray) -> None:
            s0 = time.perf_counter()
            peak, tumour = max_count_u8(rows, 128)  # one pass, GIL released
            if tumour:
                label = rows >= 128
                label_u8 = label.view(np.uint8) * np.uint8(255)
            elif peak:  # tissue without tumour: the label rows are zeros (one read-only buffer for all)
                label_u8 = _zeros(rows.shape)
                label = label_u8.view(bool)
            else:  # rows of glass between tissue: no need to threshold zeros
                label, label_u8 = rows.view(bool), rows
            # the rows are fresh arrays (or the read-only zeros) that nothing modifies: no copy into the writers
            prob_writer.write_rows(y0, rows, copy=False)
            mask_writer.write_rows(y0, label_u8, copy=False)
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
            stitching = StitchThread(stitcher, maxsize=stitch_queue)
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
        timings["read_threads_cpu"] = batches.stats.read_cpu_seconds

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
        write_slide_overlay(paths["overlay"], src, low, f, ds, max_side=overlay_max_side)
        timings["overlay"] = time.perf_counter() - t0

        timings["total"] = time.perf_counter() - t_start
        report = slide_report(src=src, stem=stem, level=level, model=model, weights=weights, model_fp=model_fp,
                              config=config, stitch=stitch, device=device, threads=threads,
                              candidates=len(candidates), batches=batches, stitcher=stitcher,
                              tumour_px=summary.count, regions=regions, tissue=tissue, tissue_l0_px=tissue_l0_px,
                              dice=dice, out_mpp=out_mpp, summary_downsample=f, started=started,
                              fingerprint=fingerprint, paths=paths, timings=timings, version=__version__)
        write_json(paths["report"], report)
    return SlideResult(str(slide) if isinstance(slide, (str, os.PathLike)) else stem, "done",
                       {k: str(p) for k, p in paths.items()}, report)


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
        clash = None if force else other_slide(out_dir, stems[i], slide)
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
