"""synth, export, bench and models: synthetic slides, ONNX/TensorRT export, the benchmark, model summaries."""
from __future__ import annotations

from pathlib import Path

from .common import parse_size


def cmd_synth(args) -> int:
    from ..synth import write_synthetic_slide

    slide, mask = write_synthetic_slide(args.out, args.size[0], args.size[1], seed=args.seed, mpp=args.mpp,
                                        layout=args.layout)
    print(f"wrote {slide} and its ground-truth mask {mask} (synthetic H&E-like data, seed {args.seed})")
    return 0


def cmd_models(args) -> int:
    from ..models.summary import format_summary

    print(format_summary(args.side))
    return 0


def cmd_export(args) -> int:
    from ..engine.export import export_checkpoint

    path = export_checkpoint(args.checkpoint, args.out, fmt=args.format, size=args.size,
                             precision=args.precision, batch_size=args.batch_size)
    print(f"wrote {path} ({args.format}, {path.stat().st_size / 1e6:.1f} MB)")
    return 0


def cmd_bench(args) -> int:
    from ..bench import main as bench_main

    return bench_main(args.bench_args)


def add_synth(sub) -> None:
    p = sub.add_parser("synth", help="write a synthetic H&E-like slide and its ground-truth mask")
    p.add_argument("out", type=Path, help="output slide: .svs (Aperio-style) or .tif (generic tiled TIFF)")
    p.add_argument("--size", type=parse_size, default=(8192, 8192), help="WIDTHxHEIGHT in level-0 pixels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mpp", type=float, default=0.25, help="microns per pixel at level 0 (0.25 is about 40x)")
    from ..synth import DEFAULT_SVS_LAYOUT, SLIDE_LAYOUTS  # noqa: PLC0415 (the help names the default)

    p.add_argument("--layout", choices=SLIDE_LAYOUTS, default=None,
                   help="aperio: as an Aperio scanner writes an SVS (levels 1, 4, 16, ..., thumbnail, label, "
                        "macro; .svs only); pow2: a level at every power of two. Default: "
                        f"{DEFAULT_SVS_LAYOUT} for .svs, pow2 for .tif")
    p.set_defaults(func=cmd_synth)


def add_export(sub) -> None:
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


def add_bench(sub) -> None:
    # every argument after `bench` goes to python -m fastgicn.bench untouched (no option parsing here)
    p = sub.add_parser("bench", help="benchmark the engine backends (python -m fastgicn.bench; -h for its flags)",
                       add_help=False, prefix_chars="\0")
    p.add_argument("bench_args", nargs="*")
    p.set_defaults(func=cmd_bench)


def add_models(sub) -> None:
    p = sub.add_parser("models", help="parameters and GMACs of each model beside the paper's figures")
    p.add_argument("--side", type=int, default=512)
    p.set_defaults(func=cmd_models)
