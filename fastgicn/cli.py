"""The `fastgicn` command: segment slides, train, make synthetic slides, summarise models.

Library errors (FastGicnError) are printed as one line naming the file or value and the fix, exit status 2;
only this module turns them into an exit status.
"""
from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

from .errors import ConfigError, FastGicnError


def parse_size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size {text!r}: write it as WIDTHxHEIGHT, e.g. 20000x15000") from None
    if w <= 0 or h <= 0:
        raise argparse.ArgumentTypeError(f"size {text!r}: width and height must be positive")
    return w, h


SEGMENT_EPILOG = """\
outputs, in OUTDIR, per slide (NAME: the slide's file name without its extension):
  NAME.tumour_probability.tif  pyramidal tiled TIFF, p(tumour) as uint8 (255 is p = 1)
  NAME.tumour_mask.tif         pyramidal tiled TIFF, 255 tumour (p >= 0.5), 0 normal or glass
  NAME.tumour.geojson          tumour polygons in level-0 pixels (QuPath imports it)
  NAME.overlay.png             thumbnail with the tumour drawn over it
  NAME.report.json             areas, tile counts, seconds per stage, model, config, Dice; written last

A slide whose report is complete for the same model, config and slide content is skipped (--force redoes
it); a different slide with the same file name is refused rather than written over the first one's
results (--force replaces them). A slide with no tissue gets empty outputs, a warning line and
tissue.found = false in its report. Failed slides are listed in OUTDIR/fastgicn_failures.tsv: retry them
with --slides-from OUTDIR/fastgicn_failures.tsv. Ctrl-C or SIGTERM removes the slide's partial files and
keeps finished slides: run the same command to resume.
Exit status: 0 every slide done (with or without tissue) or skipped, 1 a slide failed, 2 an error in the
arguments or setup (one line on stderr), 130 Ctrl-C, 143 SIGTERM.
"""


def cmd_synth(args) -> int:
    from .synth import write_synthetic_slide

    slide, mask = write_synthetic_slide(args.out, args.size[0], args.size[1], seed=args.seed, mpp=args.mpp,
                                        layout=args.layout)
    print(f"wrote {slide} and its ground-truth mask {mask} (synthetic H&E-like data, seed {args.seed})")
    return 0


def cmd_models(args) -> int:
    from .models.summary import format_summary

    print(format_summary(args.side))
    return 0


def _training_sources(args, slides, masks, seed_offset: int):
    from .synth import SyntheticSlide
    from .train import SlideSource, SyntheticSource

    if slides:
        if masks and len(masks) != len(slides):
            raise ConfigError(f"{len(slides)} slides but {len(masks)} masks: give one mask per slide, or none "
                              "to use SLIDE.mask.tif beside each slide")
        sources = [SlideSource(s, masks[i] if masks else None, annotations_dir=args.annotations,
                               annotation_rules=annotation_rules(args)) for i, s in enumerate(slides)]
        for source in sources:
            for warning in source.warnings:
                print(f"warning: {warning}", file=sys.stderr)
        return sources
    w, h = args.synthetic_size
    return [SyntheticSource(SyntheticSlide(w, h, seed=args.seed + seed_offset + i)) for i in range(args.synthetic)]


def annotation_rules(args) -> dict:
    """The group / class rules of `fastgicn mask`, `train` and `evaluate` as `read_annotations` arguments."""
    return {"tumour_groups": args.tumour_groups, "exclusion_groups": args.exclusion_groups,
            "classes": args.classes, "exclude_classes": args.exclude_classes,
            "max_mb": args.max_annotation_mb}


def add_annotation_rules(p) -> None:
    p.add_argument("--tumour-groups", nargs="+", default=None, metavar="GROUP",
                   help="ASAP XML groups that are tumour (default: Tumor _0 _1, Camelyon16's)")
    p.add_argument("--exclusion-groups", nargs="*", default=None, metavar="GROUP",
                   help="ASAP XML groups cut out of the tumour (default: Exclusion _2)")
    p.add_argument("--class", dest="classes", nargs="+", default=None, metavar="NAME",
                   help="QuPath GeoJSON classifications that are tumour, e.g. Tumor (default: every polygon, "
                        "when the file holds at most one class)")
    p.add_argument("--exclude-class", dest="exclude_classes", nargs="+", default=None, metavar="NAME",
                   help="QuPath GeoJSON classifications cut out of the tumour")
    p.add_argument("--max-annotation-mb", type=float, default=None, metavar="MB",
                   help="refuse annotation files larger than this (default: 256, or "
                        "$FASTGICN_MAX_ANNOTATION_MB)")


def cmd_mask(args) -> int:
    from .annotations import mask_from_annotations

    written = mask_from_annotations(args.slide, args.annotations, args.out, **annotation_rules(args))
    for warning in written.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"wrote {written.path}: {written.width}x{written.height}, {written.regions} tumour polygons "
          f"({written.excluded_regions} cut out), {written.tumour_pixels} tumour pixels, "
          f"{written.seconds:.1f} s")
    return 0


def cmd_evaluate(args) -> int:
    from .evaluate import evaluate

    result = evaluate(args.out_dir, args.truth, rules=annotation_rules(args),
                      small_region_pixels=args.small_region_pixels,
                      log=lambda msg: print(msg, file=sys.stderr))
    print(result["markdown"], end="")
    print(f"wrote {args.out_dir}/evaluation.md, evaluation.csv and evaluation.json")
    return 0


def _inference_tile_config(args, source):
    """The tile config stored in the checkpoint, so `segment` reads slides at the resolution trained on."""
    from .config import TileConfig

    overlap = 32 if args.patch_size >= 128 else 0
    mpp = getattr(source.slide, "mpp", None)
    if mpp:
        return TileConfig(tile_size=args.patch_size, overlap=overlap, target_mpp=mpp * args.downsample)
    level = 0 if args.downsample == 1 else source._level(source.slide, args.downsample)
    return TileConfig(tile_size=args.patch_size, overlap=overlap, level=level)


def cmd_train(args) -> int:
    from .train.distributed import torchrun_world

    with torchrun_world(args.device) as world:  # one process, or this rank of a torchrun job
        return _train(args, world)


def _train(args, world) -> int:
    from .config import TileConfig
    from .train import PatchDataset, Trainer, TrainConfig

    model_kwargs = {"width": args.width}
    if args.model != "resnet50_gpp":
        model_kwargs["k"] = args.k
    config = TrainConfig(model=args.model, model_kwargs=model_kwargs, iterations=args.iterations,
                         batch_size=args.batch_size, schedule=args.schedule, lr=args.lr, seed=args.seed,
                         eval_every=args.eval_every, checkpoint_every=args.checkpoint_every, device=args.device,
                         log_every=args.log_every, precision=args.precision, channels_last=args.channels_last,
                         compile=args.compile, sync_bn=args.sync_bn, workers=args.workers)
    world.share(args.batch_size)  # a batch that does not split over the ranks: refused before any slide is read
    say = print if world.is_main else (lambda *_: None)  # rank 0 speaks for a torchrun job
    if not args.slides and not args.synthetic:
        raise ConfigError("no training data: pass slides (with SLIDE.mask.tif beside them or --masks), "
                          "or --synthetic N to train on N synthetic slides")
    if args.downsample < 1:
        raise ConfigError(f"--downsample {args.downsample}: use a pyramid downsample of 1 or more")
    try:
        TileConfig(tile_size=args.patch_size)  # validates the patch size before any slide is read
    except ConfigError as exc:
        raise ConfigError(f"--patch-size {args.patch_size}: {exc}") from None
    cache = not args.slides
    sources = _training_sources(args, args.slides, args.masks, 0)
    train_set = PatchDataset(sources, size=args.patch_size, downsample=args.downsample,
                             positive_fraction=args.positive_fraction, cache=cache)
    val_set = None
    if args.val_slides or args.synthetic:
        val_set = PatchDataset(_training_sources(args, args.val_slides, args.val_masks, 10_000),
                               size=args.patch_size, downsample=args.downsample, cache=cache)
    say(f"training {args.model}({model_kwargs}) on {len(train_set)} patches "
        f"({len(train_set.positive)} with tumour); validating on {len(val_set) if val_set else 0}"
        + (f"; {world.size} processes, {args.batch_size // world.size} patches each" if world.size > 1
           else ""))
    trainer = Trainer(config, train_set, val_set, _inference_tile_config(args, sources[0]), out_dir=args.out,
                      log=say, world=world)
    if args.resume:
        trainer.resume(args.resume)
        say(f"resumed from {args.resume} at iteration {trainer.iteration}")
    trainer.fit()
    say(f"checkpoint: {Path(args.out) / 'last.pt'}")
    return 0


def read_slide_list(path: Path) -> list[Path]:
    """Slide paths from a list file: the first tab-separated column of each line; blank and '#' lines skipped."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ConfigError(f"--slides-from {path}: cannot be read ({exc.strerror or exc}); check the path") from None
    except UnicodeDecodeError:
        raise ConfigError(f"--slides-from {path}: not a UTF-8 text file; give a list of slide paths, one per "
                          "line") from None
    slides = [Path(line.split("\t", 1)[0]) for line in lines if line.strip() and not line.startswith("#")]
    if not slides:
        raise ConfigError(f"--slides-from {path}: lists no slide; give one slide path per line")
    return slides


def cmd_segment(args) -> int:
    import os

    import torch

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    slides, truths = list(args.slides), args.truth
    if args.slides_from is not None:
        slides += read_slide_list(args.slides_from)
    if truths is not None and len(truths) != max(1, len(slides)):
        raise ConfigError(f"{len(truths)} --truth masks for {len(slides)} slides: give one mask per slide")
    threads = args.torch_threads
    if threads is not None and threads < 1:
        raise ConfigError(f"--torch-threads {threads}: use a positive number of threads")
    if threads is None and not str(args.device).startswith("cuda") and hasattr(os, "getloadavg") \
            and os.getloadavg()[0] > (os.cpu_count() or 1):
        threads = 1  # torch's OpenMP threads stall when other processes already keep every core busy
        log(f"load average {os.getloadavg()[0]:.1f} > {os.cpu_count()} cores: torch runs on one thread "
            "(--torch-threads to choose)")
    saved_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _segment(args, slides, truths, log)
    finally:
        torch.set_num_threads(saved_threads)


def _segment(args, slides, truths, log) -> int:
    from .config import TileConfig
    from .checkpoint import load_model
    from .cohort import ensure_out_dir
    from .demo import DEMO_SIZE, demo_slide
    from .pipeline import segment_slides

    model, payload, weights = load_model(args.weights, args.device)
    values = dict(payload.get("tile_config") or {})
    for key in ("tile_size", "overlap", "batch_size", "min_tissue_fraction", "white_threshold"):
        if getattr(args, key) is not None:
            values[key] = getattr(args, key)
    if args.level is not None:
        values["level"], values["target_mpp"] = args.level, None
    if args.target_mpp is not None:
        values["level"], values["target_mpp"] = None, args.target_mpp
    if args.no_tissue_prefilter:
        values["tissue_prefilter"] = False
    config = TileConfig.from_dict(values)
    if args.threads is not None and args.threads < 1:
        raise ConfigError(f"--threads {args.threads}: use a positive number of reader threads")
    ensure_out_dir(args.out)
    # Everything cheap is checked above, before the (slow) synthetic demo slide is written.
    if not slides:
        slide, mask = demo_slide(args.out, args.demo_size or DEMO_SIZE, args.seed, log=log)
        slides, truths = [slide], truths or [mask]
        if args.weights is None:
            log("segmenting it with the demo weights (trained on synthetic slides only) and its mask as truth")
    forward, model_fp, how = model, None, "torch (eager reference)"
    # --precision fp16/bf16 with the torch backend is honoured (weights and activations in 16 bits) through the
    # Engine's torch backend; fp32 and auto keep the eager fp32 reference.
    engine_wanted = args.backend != "torch" or args.precision in ("fp16", "bf16")
    if engine_wanted and args.ray is not None:  # each Ray worker builds it on its own device
        how = f"{args.backend}, precision {args.precision}: built by each Ray worker"
    elif engine_wanted:
        from .engine import Engine
        from .engine.base import model_fingerprint

        engine = Engine(model, backend=args.backend, precision=args.precision, device=args.device,
                        batch_size=config.batch_size, tile_size=config.tile_size)
        forward, model_fp, how = engine.backend, model_fingerprint(model), engine.describe()
        for name in ("model_name", "model_kwargs"):  # for the report
            setattr(forward, name, getattr(model, name))
    where = f"level {config.level}" if config.level is not None else f"target {config.target_mpp} um/px"
    log(f"model {model.model_name}({model.model_kwargs}) from {weights}; tiles {config.tile_size} px, overlap "
        f"{config.overlap}, {where}, batch {config.batch_size}, stitch {args.stitch}, device {args.device}")
    log(how if how.startswith("Engine") else f"backend: {how}")
    common = dict(truths=truths, stitch=args.stitch, force=args.force, log=log, threads=args.threads,
                  handles=args.handles, mpp=args.mpp, weights=weights, progress=False if args.no_progress else None,
                  min_region_um2=args.min_region_um2)
    if args.ray is not None:  # the workers build the backend themselves, once each (fastgicn.distributed)
        from .distributed import segment_slides_ray

        engine = None if not engine_wanted else {"backend": args.backend, "precision": args.precision,
                                                 "batch_size": config.batch_size, "tile_size": config.tile_size}
        results = segment_slides_ray(slides, args.out, model, config, address=args.ray, workers=args.workers,
                                     engine=engine, **common)
    else:
        if args.workers is not None:
            raise ConfigError("--workers sets the number of Ray workers: use it with --ray local|auto|ADDRESS")
        results = segment_slides(slides, args.out, forward, config, args.device, model_fp=model_fp, **common)
    for r in results:
        if r.status == "failed":
            print(f"{r.slide}: FAILED: {r.error}")
            continue
        line = f"{r.slide}: {r.status}; outputs in {args.out} ({Path(r.outputs['report']).name} ...)"
        if r.report and r.report.get("dice"):
            line += f"; Dice {r.report['dice']['dice']:.4f} against {r.report['dice']['truth']}"
        print(line)
    failed = sum(r.status == "failed" for r in results)
    return 1 if failed else 0


def cmd_export(args) -> int:
    from .engine.export import export_checkpoint

    path = export_checkpoint(args.checkpoint, args.out, fmt=args.format, size=args.size,
                             precision=args.precision, batch_size=args.batch_size)
    print(f"wrote {path} ({args.format}, {path.stat().st_size / 1e6:.1f} MB)")
    return 0


def cmd_bench(args) -> int:
    from .bench import main as bench_main

    return bench_main(args.bench_args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastgicn", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("segment", help="segment tumour in whole slides: TIFF masks, GeoJSON, overlay, report",
                       description="Segment tumour in slides. With no SLIDE, makes (or reuses) a synthetic "
                                   "slide in OUTDIR and\nsegments it with the demo weights, its mask as truth.",
                       epilog=SEGMENT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("slides", nargs="*", type=Path, metavar="SLIDE",
                   help="whole-slide images (SVS, NDPI, MRXS, tiled TIFF ... anything OpenSlide reads; plain "
                        "TIFF/PNG/JPEG too); none: the synthetic demo slide")
    p.add_argument("--slides-from", type=Path, default=None, metavar="FILE",
                   help="also segment the slides listed in FILE, one path per line (the first tab-separated "
                        "column; '#' lines ignored): e.g. OUTDIR/fastgicn_failures.tsv to retry a run's failures")
    p.add_argument("-o", "--out", type=Path, required=True, metavar="OUTDIR",
                   help="output directory (created); outputs are named after each slide, see below")
    p.add_argument("--weights", type=Path, default=None, metavar="CKPT",
                   help="checkpoint from `fastgicn train` (default: the demo weights, synthetic data only)")
    p.add_argument("--device", default="cpu", help="cpu, cuda (the current GPU) or cuda:N (default: cpu)")
    p.add_argument("--truth", nargs="+", type=Path, default=None, metavar="MASK",
                   help="ground-truth mask per slide (0 normal, 255 tumour): Dice goes in the report")
    p.add_argument("--tile-size", type=int, default=None, metavar="PX",
                   help="tile side in pixels, a multiple of 8 (default: the checkpoint's; demo weights: 256)")
    p.add_argument("--overlap", type=int, default=None, metavar="PX",
                   help="pixels shared by neighbouring tiles, even (default: the checkpoint's; demo weights: 32)")
    p.add_argument("--batch-size", type=int, default=None, metavar="N",
                   help="tiles per forward pass (default: the checkpoint's; demo weights: 8)")
    level = p.add_mutually_exclusive_group()
    level.add_argument("--level", type=int, default=None,
                       help="pyramid level to read, 0 the full resolution (default: the checkpoint's target MPP)")
    level.add_argument("--target-mpp", type=float, default=None, metavar="UM_PER_PX",
                       help="read the level nearest this um/px, reduced when no level is within 15%% "
                            "(default: the checkpoint's; demo weights: 0.5, about 20x)")
    p.add_argument("--min-tissue-fraction", type=float, default=None, metavar="F",
                   help="fraction of non-glass pixels a tile needs to be segmented; 0 keeps every tile with one "
                        "(the paper's rule) (default: the checkpoint's; demo weights: 0.01)")
    p.add_argument("--white-threshold", type=int, default=None, metavar="V",
                   help="glass: R, G and B all above this (default: the checkpoint's; demo weights: 220)")
    p.add_argument("--no-tissue-prefilter", action="store_true",
                   help="read every tile, not only those touching the low-resolution tissue mask")
    p.add_argument("--stitch", choices=["crop", "blend"], default="blend",
                   help="blend the overlap with linear ramps (no seam), or crop it at its middle (less memory) "
                        "(default: blend)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="reader threads decoding tiles (default: the cores this process may use, from its CPU "
                        "affinity and container quota, at most 16)")
    p.add_argument("--backend", default="torch",
                   choices=["torch", "auto", "compiled", "onnxruntime", "tensorrt"],
                   help="engine backend for the forward pass (auto: the fastest that builds and matches torch) "
                        "(default: torch, the eager fp32 reference)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                   help="compute precision; fp16/bf16 also with --backend torch (fp16 needs a GPU). auto: fp32 "
                        "with --backend torch, else fp16 on a GPU and fp32 on a CPU (default: auto)")
    p.add_argument("--torch-threads", type=int, default=None, metavar="N",
                   help="CPU threads for the network (default: torch's, or 1 when the cores are already busy)")
    p.add_argument("--handles", choices=["shared", "per_thread"], default="shared",
                   help="OpenSlide handles: one shared, or one per reader thread (default: shared)")
    p.add_argument("--mpp", type=float, default=None, metavar="UM_PER_PX",
                   help="microns per pixel of level 0: overrides what the slide records (and fills it in where it "
                        "records none or an implausible value, such as a 72-dpi tag); default: the slide's")
    p.add_argument("--min-region-um2", type=float, default=100.0, metavar="UM2",
                   help="leave tumour regions smaller than this out of the GeoJSON (not the masks); 100 um^2 is "
                        "about one tumour cell. Slides without an MPP (and no --mpp) use 1600 level-0 pixels "
                        "instead, as the report says (default: 100)")
    p.add_argument("--force", action="store_true",
                   help="redo slides whose outputs are already complete (default: skip them)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar on stderr (default: a bar when stderr is a terminal)")
    p.add_argument("--ray", default=None, metavar="local|auto|ADDRESS",
                   help="segment on a Ray cluster: 'local' starts Ray on this machine, 'auto' or an address "
                        "(HOST:6379, ray://HOST:10001) joins a running one; one worker per GPU (pip install "
                        "'fastgicn[ray]'; OUTDIR must be storage every node sees)")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="with --ray: N workers (default: one per GPU of the cluster, or one CPU worker)")
    p.add_argument("--demo-size", type=parse_size, default=None, metavar="WxH",
                   help="WIDTHxHEIGHT of the synthetic demo slide (default: 28000x28000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic demo slide (default: 0)")
    p.set_defaults(func=cmd_segment)

    p = sub.add_parser("synth", help="write a synthetic H&E-like slide and its ground-truth mask")
    p.add_argument("out", type=Path, help="output slide: .svs (Aperio-style) or .tif (generic tiled TIFF)")
    p.add_argument("--size", type=parse_size, default=(8192, 8192), help="WIDTHxHEIGHT in level-0 pixels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mpp", type=float, default=0.25, help="microns per pixel at level 0 (0.25 is about 40x)")
    from .synth import DEFAULT_SVS_LAYOUT, SLIDE_LAYOUTS  # noqa: PLC0415 (the help names the default)

    p.add_argument("--layout", choices=SLIDE_LAYOUTS, default=None,
                   help="aperio: as an Aperio scanner writes an SVS (levels 1, 4, 16, ..., thumbnail, label, "
                        "macro; .svs only); pow2: a level at every power of two. Default: "
                        f"{DEFAULT_SVS_LAYOUT} for .svs, pow2 for .tif")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("train", help="train a model on slides with tumour masks (or on synthetic slides)")
    p.add_argument("slides", nargs="*", type=Path)
    p.add_argument("--masks", nargs="*", type=Path, default=None,
                   help="one mask (or ASAP .xml / QuPath .geojson) per slide (default: SLIDE.mask.tif, "
                        "SLIDE.xml or SLIDE.geojson beside it)")
    p.add_argument("--annotations", type=Path, default=None, metavar="DIR",
                   help="also look for STEM.xml / STEM.geojson / STEM.mask.tif here (Camelyon16's "
                        "annotations/); a slide with none there is an all-normal negative")
    add_annotation_rules(p)
    p.add_argument("--val-slides", nargs="*", type=Path, default=[])
    p.add_argument("--val-masks", nargs="*", type=Path, default=None)
    p.add_argument("--synthetic", type=int, default=0, help="train on N synthetic slides instead of files")
    p.add_argument("--synthetic-size", type=parse_size, default=(2048, 2048))
    p.add_argument("--model", default="resnet50_gicn_gpp")
    p.add_argument("--k", type=int, default=7, help="GICN kernel size (odd, 1..15)")
    p.add_argument("--width", type=float, default=1.0, help="channel multiplier (1.0 is the paper's network)")
    p.add_argument("--patch-size", type=int, default=512)
    p.add_argument("--downsample", type=int, default=1, help="read patches at this pyramid downsample")
    p.add_argument("--positive-fraction", type=float, default=0.5)
    p.add_argument("--iterations", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--schedule", default="camelyon16", choices=["camelyon16", "gastric", "constant"])
    p.add_argument("--lr", type=float, default=None, help="base learning rate (replaces the schedule's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=0)
    p.add_argument("--checkpoint-every", type=int, default=500)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--device", default="cpu",
                   help="cpu, cuda or cuda:N (under torchrun: cuda is each rank's GPU)")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32",
                   help="fp32 (the reference), bf16 autocast, or fp16 autocast with loss scaling")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels-last memory layout (default: on with bf16 / fp16)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model for the training step")
    p.add_argument("--workers", type=int, default=0,
                   help="patch-loading processes (0: the main process); batches are the same for any number")
    p.add_argument("--sync-bn", action="store_true", help="under torchrun on GPUs: batch norm over all ranks")
    p.add_argument("--resume", type=Path, default=None, help="continue from a checkpoint written by train")
    p.add_argument("-o", "--out", type=Path, default=Path("runs/train"))
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("mask", help="rasterise ASAP XML / QuPath GeoJSON annotations into a level-0 mask",
                       description="Rasterise annotations into a lossless pyramidal mask aligned with level 0 "
                                   "of SLIDE (0 normal, 255 tumour, the slide's MPP): a pixel is tumour when "
                                   "its centre lies inside a tumour polygon and outside every cut-out one.")
    p.add_argument("slide", type=Path, metavar="SLIDE", help="the slide annotated (its size and MPP are used)")
    p.add_argument("annotations", type=Path, metavar="ANNOTATIONS", help="ASAP .xml or QuPath .geojson")
    p.add_argument("-o", "--out", type=Path, required=True, metavar="MASK.tif", help="the mask to write")
    add_annotation_rules(p)
    p.set_defaults(func=cmd_mask)

    p = sub.add_parser("evaluate", help="Dice, XS/XL Dice, precision, recall of segment outputs vs truth",
                       description="Score the NAME.tumour_mask.tif files of OUT_DIR against truth masks or "
                                   "annotations matched by name; writes evaluation.md/.csv/.json in OUT_DIR, "
                                   "with the paper's published figures beside ours.")
    p.add_argument("out_dir", type=Path, metavar="OUT_DIR", help="the -o directory of fastgicn segment")
    p.add_argument("--truth", nargs="+", type=Path, required=True, metavar="MASK_OR_ANNOTATIONS",
                   help="NAME.mask.tif, NAME.xml or NAME.geojson files, or folders of them")
    p.add_argument("--small-region-pixels", type=float, default=50_000, metavar="PX",
                   help="truth regions under this many pixels (at the segment resolution) are small, XS "
                        "(default: 50000, the paper's Table 4)")
    add_annotation_rules(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("export", help="export a checkpoint to ONNX (standard ops) or a TensorRT engine")
    p.add_argument("checkpoint", type=Path, help="a .pt checkpoint written by `fastgicn train`")
    p.add_argument("--format", choices=["onnx", "tensorrt"], default="onnx")
    p.add_argument("-o", "--out", type=Path, required=True, help="output file (.onnx or .engine)")
    p.add_argument("--size", type=int, default=None, help="tile side (default: the checkpoint's tile size)")
    p.add_argument("--precision", choices=["fp32", "fp16", "bf16"], default=None,
                   help="default fp32 for ONNX, fp16 for TensorRT")
    p.add_argument("--batch-size", type=int, default=None,
                   help="TensorRT: batch the engine is tuned for and its maximum (default: checkpoint's)")
    p.set_defaults(func=cmd_export)

    # every argument after `bench` goes to python -m fastgicn.bench untouched (no option parsing here)
    p = sub.add_parser("bench", help="benchmark the engine backends (python -m fastgicn.bench; -h for its flags)",
                       add_help=False, prefix_chars="\0")
    p.add_argument("bench_args", nargs="*")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("models", help="parameters and GMACs of each model beside the paper's figures")
    p.add_argument("--side", type=int, default=512)
    p.set_defaults(func=cmd_models)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C, so the same cleanup runs (partial outputs removed)."""


def _on_sigterm(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
    raise Terminated()


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    in_main = threading.current_thread() is threading.main_thread()  # signal handlers live there only
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if in_main else None
    try:
        return args.func(args)
    except FastGicnError as exc:
        print(f"fastgicn {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except Terminated:
        what = ("partial outputs removed, finished slides kept; run the same command to resume"
                if args.command == "segment" else "finished outputs are kept")
        print(f"fastgicn {args.command}: terminated (SIGTERM): {what}", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print(f"fastgicn {args.command}: interrupted; finished outputs are kept", file=sys.stderr)
        return 130
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


if __name__ == "__main__":
    sys.exit(main())
