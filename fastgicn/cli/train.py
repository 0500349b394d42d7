"""`fastgicn train`: its flags, the training and validation sources, the tile config a checkpoint stores."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import ConfigError
from .annotations import add_annotation_rules, annotation_rules
from .common import parse_size


def _training_sources(args, slides, masks, seed_offset: int):
    from ..synth import SyntheticSlide
    from ..train import SlideSource, SyntheticSource

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


def _inference_tile_config(args, source):
    """The tile config stored in the checkpoint, so `segment` reads slides at the resolution trained on."""
    from ..config import TileConfig

    overlap = 32 if args.patch_size >= 128 else 0
    mpp = getattr(source.slide, "mpp", None)
    if mpp:
        return TileConfig(tile_size=args.patch_size, overlap=overlap, target_mpp=mpp * args.downsample)
    level = 0 if args.downsample == 1 else source._level(source.slide, args.downsample)
    return TileConfig(tile_size=args.patch_size, overlap=overlap, level=level)


def cmd_train(args) -> int:
    from ..train.distributed import torchrun_world

    with torchrun_world(args.device) as world:  # one process, or this rank of a torchrun job
        return _train(args, world)


def _train(args, world) -> int:
    from ..config import TileConfig
    from ..train import PatchDataset, Trainer, TrainConfig

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


def add_train(sub) -> None:
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
