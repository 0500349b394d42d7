"""The entry points of the flow: `segment_slide` (one slide) and `segment_slides` (a cohort on one device).

`segment_slide(slide, out_dir, model, config, device)` runs one `SlideJob` (fastgicn/slide_job.py: the stages
of one slide) through its three phases. `segment_slides(paths, ...)` runs many slides: a slide whose report
says it is complete for the same model, config and slide content is skipped, another slide under the same
name is refused, a bad slide is reported and skipped (and listed in the failure manifest), and a run killed
midway resumes with the first incomplete slide. Slide i+1 is prepared (opened, tissue mask, first batches
read) on a `fastgicn-prepare` thread and slide i-1 finished on `fastgicn-finish` while slide i runs: the
device does not wait between slides (`fastgicn.distributed` runs the same jobs in one Ray actor per GPU).
"""
from __future__ import annotations

import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait

from .cohort import ensure_out_dir, model_fingerprint, plan_slide, write_failures
from .config import TileConfig
from .engine.runner import TUMOUR_CLASS  # noqa: F401 (re-exported)
from .errors import ConfigError, FastGicnError
from .naming import OUTPUT_SUFFIXES, output_paths, slide_stem  # noqa: F401 (re-exported)
from .outputs.polygons import DEFAULT_MIN_REGION_PIXELS, DEFAULT_MIN_REGION_UM2
from .outputs.report import REPORT_FORMAT, outputs_complete  # noqa: F401 (re-exported)
from .slide_job import SlideJob, SlideResult

__all__ = ["segment_slide", "segment_slides", "SlideJob", "SlideResult", "output_paths", "outputs_complete"]


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


def _call(fn, catch=(FastGicnError, OSError)) -> Future:
    """`fn()` run now, its outcome (or one of the `catch` exceptions) held as a future: the serial stand-in
    for a thread pool."""
    fut: Future = Future()
    try:
        fut.set_result(fn())
    except catch as exc:
        fut.set_exception(exc)
    return fut
