"""`fastgicn segment`: its flags and help, the slide list, the run over the slides (local or on Ray)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import ConfigError
from .common import parse_size


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
    from ..config import TileConfig
    from ..checkpoint import load_model
    from ..cohort import ensure_out_dir
    from ..demo import DEMO_SIZE, demo_slide
    from ..pipeline import segment_slides

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
        from ..engine import Engine
        from ..engine.base import model_fingerprint

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
        from ..distributed import segment_slides_ray

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


def add_segment(sub) -> None:
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
