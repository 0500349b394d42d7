"""`fastgicn mask` and `evaluate`, and the annotation group / class flags they share with `train`."""
from __future__ import annotations

import sys
from pathlib import Path


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
    from ..annotations import mask_from_annotations

    written = mask_from_annotations(args.slide, args.annotations, args.out, **annotation_rules(args))
    for warning in written.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"wrote {written.path}: {written.width}x{written.height}, {written.regions} tumour polygons "
          f"({written.excluded_regions} cut out), {written.tumour_pixels} tumour pixels, "
          f"{written.seconds:.1f} s")
    return 0


def cmd_evaluate(args) -> int:
    from ..evaluate import evaluate

    result = evaluate(args.out_dir, args.truth, rules=annotation_rules(args),
                      small_region_pixels=args.small_region_pixels,
                      log=lambda msg: print(msg, file=sys.stderr))
    print(result["markdown"], end="")
    print(f"wrote {args.out_dir}/evaluation.md, evaluation.csv and evaluation.json")
    return 0


def add_mask(sub) -> None:
    p = sub.add_parser("mask", help="rasterise ASAP XML / QuPath GeoJSON annotations into a level-0 mask",
                       description="Rasterise annotations into a lossless pyramidal mask aligned with level 0 "
                                   "of SLIDE (0 normal, 255 tumour, the slide's MPP): a pixel is tumour when "
                                   "its centre lies inside a tumour polygon and outside every cut-out one.")
    p.add_argument("slide", type=Path, metavar="SLIDE", help="the slide annotated (its size and MPP are used)")
    p.add_argument("annotations", type=Path, metavar="ANNOTATIONS", help="ASAP .xml or QuPath .geojson")
    p.add_argument("-o", "--out", type=Path, required=True, metavar="MASK.tif", help="the mask to write")
    add_annotation_rules(p)
    p.set_defaults(func=cmd_mask)


def add_evaluate(sub) -> None:
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
