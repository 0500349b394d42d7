"""`fastgicn evaluate`: the masks `fastgicn segment` wrote, against ground truth, as the paper scores them.

Per slide and pooled: Dice = 2|X and Y| / (|X| + |Y|) (1.0 when both are empty; paper eq. 3, Table 1),
pixel precision |X and Y| / |X| and recall |X and Y| / |Y| (None where undefined), and the Table 4 split:
Dice over small (XS) and large (XL) tumour regions, 8-connected, small under 50,000 pixels
(`fastgicn.models.metrics.dice_by_size`, which owns the rule).

Where it is computed: on the grid of the predicted mask, the resolution `fastgicn segment` read the slide at
(the model's input: e.g. 0.5 um/px for the demo weights; the report's `read.downsample` d level-0 pixels per
pixel), pixel counts streamed in bands (bounded memory, any slide size). The truth is brought to that grid:
a mask (``NAME.mask.tif``, 0 normal / 255 tumour, level-0 aligned) is read as `TruthDice` reads it in the
segment report (a level within 1 %, or a finer one box-reduced: tumour where the mean is > 127), so both
Dice agree; annotations (ASAP XML / QuPath GeoJSON) are rasterised on the grid itself by the pixel-centre
rule (`fastgicn.annotations.rasterise`). The XS/XL split needs whole-slide connected components, so it is
computed on the finest level of that grid coarsened by a power of two F whose size is at most
`max_split_pixels` (16.8 Mpx: F = 1, the grid itself, up to 4096 x 4096), with `small_region_pixels` counted
on the grid (the model's input resolution, where the paper counts) and divided by F^2; the JSON and the
Markdown say which F. Slides are matched by name: NAME.tumour_mask.tif with NAME.mask.tif / NAME.xml /
NAME.geojson.

Outputs in OUT_DIR, each written atomically: evaluation.md (printed), evaluation.csv, evaluation.json; the
paper's published figures beside ours, labelled as the paper's, on its data.
"""
from __future__ import annotations

import csv
import io
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .errors import ConfigError
from .naming import OUTPUT_SUFFIXES

__all__ = ["evaluate", "evaluate_slide", "SlideEvaluation", "find_truths", "PAPER_TABLE1", "PAPER_TABLE4",
           "EVALUATION_NAMES"]

# Qin et al. 2018, Table 1 (Camelyon16, 2 test slides; Dice %) and Table 4 (XS / XL Dice %; the table
# appears in section 4.2, Gastric WSIs Data, and the text does not name its test set).
PAPER_TABLE1 = {"FCN-VGG16": 46.55, "U-Net": 37.4, "SegNet": 50.82, "ResNet50-GICN (k = 7)": 59.18,
                "ResNet50-GPP": 61.33, "ResNet50-GICN-GPP (k = 7)": 63.70}
PAPER_TABLE4 = {"FCN-VGG16": (34.80, 48.14), "U-Net": (45.36, 22.67), "SegNet": (48.52, 52.43),
                "ResNet50-GICN (k = 7)": (45.20, 62.48), "ResNet50-GPP": (59.29, 57.17),
                "ResNet50-GICN-GPP (k = 7)": (63.11, 64.03)}
PAPER_NAME = {"resnet50_gicn_gpp": "ResNet50-GICN-GPP (k = 7)", "resnet50_gicn": "ResNet50-GICN (k = 7)",
              "resnet50_gpp": "ResNet50-GPP"}
EVALUATION_NAMES = ("evaluation.md", "evaluation.csv", "evaluation.json")
MASK_TRUTH_SUFFIXES = (".mask.tif", ".mask.tiff")
MAX_SPLIT_PIXELS = 1 << 24
_CHUNK = 8192
_BAND = 512


@dataclass
class SlideEvaluation:
    """One slide's scores (see the module docstring); pixel counts on the prediction's grid."""

    slide: str
    prediction: str
    truth: str
    truth_kind: str  # "mask" or "annotations"
    downsample: float  # level-0 pixels per grid pixel
    grid: tuple
    intersection_pixels: int
    predicted_pixels: int
    truth_pixels: int
    dice: float
    precision: float | None
    recall: float | None
    dice_small: float
    dice_large: float
    regions_small: int
    regions_large: int
    split_factor: int  # the XS/XL split's grid coarsening F
    small_region_pixels_at_split: float
    model: str | None = None
    warnings: list = field(default_factory=list)


def _ratio(num: int, den: int) -> float | None:
    return None if den == 0 else num / den


def _dice(inter: int, pred: int, truth: int) -> float:
    return 1.0 if pred + truth == 0 else 2.0 * inter / (pred + truth)


def find_truths(paths) -> dict[str, Path]:
    """Truth files by slide name, from files and directories (a directory gives its *.mask.tif, *.xml and
    *.geojson files; .json only when named). Two truths for one slide are an error naming both."""
    from .annotations import annotation_stem

    found: dict[str, Path] = {}
    for p in map(Path, paths):
        if p.is_dir():
            files = sorted(f for f in p.iterdir() if f.is_file() and f.name.lower().endswith(
                MASK_TRUTH_SUFFIXES + (".xml", ".geojson")))
        elif p.is_file():
            files = [p]
        else:
            raise ConfigError(f"--truth {p}: no such file or directory; give masks, annotation files or "
                              "folders")
        for f in files:
            stem = annotation_stem(f)
            if stem in found and found[stem] != f:
                raise ConfigError(f"two truths for slide {stem}: {found[stem]} and {f}; give one of them")
            found[stem] = f
    return found


def _truth_reader(truth: Path, downsample: float, level0: tuple | None, rules: dict):
    """(kind, read(x, y, w, h) -> bool array on the grid, close, warnings, renderer factory for F)."""
    from .annotations import MaskRenderer, read_annotations

    if truth.name.lower().endswith(MASK_TRUTH_SUFFIXES) or truth.suffix.lower() in (".tif", ".tiff"):
        from .slide import open_slide
        from .slide.resolution import resolution_at

        reader = open_slide(truth)
        if level0 is not None and tuple(reader.dimensions) != tuple(level0):
            reader.close()
            raise ConfigError(f"truth mask {truth} is {reader.dimensions[0]}x{reader.dimensions[1]} but its "
                              f"slide was {level0[0]}x{level0[1]}: the mask must be aligned with the slide's "
                              "level 0")

        def at(factor: float):
            res = resolution_at(reader, downsample * factor, tolerance=0.01)

            tw, th = res.dimensions

            def read(x, y, w, h):  # beyond the mask's edge is normal (read_region would give white)
                out = np.zeros((h, w), bool)
                vw, vh = min(w, tw - x), min(h, th - y)
                if vw > 0 and vh > 0:
                    l0_x, l0_y = int(round(x * res.downsample)), int(round(y * res.downsample))
                    out[:vh, :vw] = reader.read_region(l0_x, l0_y, res, vw, vh)[..., 0] > 127
                return out
            return read, res.dimensions
        return "mask", at, reader.close, [], tuple(reader.dimensions)
    annotations = read_annotations(truth, **rules)
    warnings = list(annotations.warnings)
    if level0 is not None:
        warnings += annotations.clip_warnings(*level0)

    def at(factor: float):
        renderer = MaskRenderer(annotations, downsample * factor)
        dims = None if level0 is None else tuple(math.ceil(v / (downsample * factor) - 1e-9) for v in level0)
        return (lambda x, y, w, h: renderer.render(x, y, w, h) > 0), dims
    return "annotations", at, lambda: None, warnings, level0


def evaluate_slide(prediction, truth, *, report: dict | None = None, rules: dict | None = None,
                   small_region_pixels: float = 50_000,
                   max_split_pixels: int = MAX_SPLIT_PIXELS) -> SlideEvaluation:
    """Score one predicted mask (NAME.tumour_mask.tif) against its truth (see the module docstring).
    `report` is the slide's segment report (its level-0 size and the downsample read); without it the
    downsample comes from a truth mask's size, and annotations cannot be placed (ConfigError)."""
    from .models.metrics import dice_by_size
    from .slide import open_slide

    prediction, truth = Path(prediction), Path(truth)
    try:  # a report from another version, or edited by hand, places nothing
        level0 = tuple(int(v) for v in report["slide"]["dimensions"])
        d = float(report["read"]["downsample"])
        if len(level0) != 2 or not d > 0:
            raise ValueError
    except (KeyError, TypeError, ValueError):
        level0 = d = report = None
    pred = open_slide(prediction)
    closers = [pred.close]
    try:
        gw, gh = pred.dimensions
        if d is None:
            if not truth.name.lower().endswith(MASK_TRUTH_SUFFIXES + (".tif", ".tiff")):
                raise ConfigError(f"{prediction}: no usable segment report beside it, so annotations "
                                  f"{truth.name} cannot be placed on its grid; evaluate an OUT_DIR of "
                                  "fastgicn segment")
            with open_slide(truth) as t:
                d = t.dimensions[0] / gw
        kind, at, close, warnings, level0 = _truth_reader(truth, d, level0, rules or {})
        closers.append(close)
        read_truth, dims = at(1.0)
        # a scanner's stored level may round its size the other way than a reduction does: 1 px is slack
        if dims is not None and (abs(dims[0] - gw) > 1 or abs(dims[1] - gh) > 1):
            raise ConfigError(f"{prediction.name} is {gw}x{gh} but its truth {truth.name} is "
                              f"{dims[0]}x{dims[1]} at downsample {d:g}: are they of the same slide?")
        inter = n_pred = n_truth = 0
        for y in range(0, gh, _BAND):
            n = min(_BAND, gh - y)
            for x in range(0, gw, _CHUNK):
                w = min(_CHUNK, gw - x)
                p = pred.read_region(x, y, 0, w, n)[..., 0] > 127
                t = read_truth(x, y, w, n)
                inter += int(np.count_nonzero(p & t))
                n_pred += int(np.count_nonzero(p))
                n_truth += int(np.count_nonzero(t))
        factor = 1
        while math.ceil(gw / factor) * math.ceil(gh / factor) > max_split_pixels:
            factor *= 2
        sw, sh = math.ceil(gw / factor), math.ceil(gh / factor)
        read_split, split_dims = at(float(factor))
        if split_dims is not None:
            sw, sh = min(sw, split_dims[0]), min(sh, split_dims[1])
        if factor == 1:
            p_split = pred.read_region(0, 0, 0, sw, sh)[..., 0] > 127
        else:
            from .slide.resolution import resolution_at

            coarse = resolution_at(pred, factor, tolerance=0.01)
            p_split = pred.read_region(0, 0, coarse, sw, sh)[..., 0] > 127
        small_at_split = small_region_pixels / factor ** 2
        split = dice_by_size(p_split, read_split(0, 0, sw, sh), small_pixels=small_at_split)
    finally:
        for close in closers:
            close()
    model = ((report or {}).get("model") or {}).get("name")
    return SlideEvaluation(
        slide=prediction.name[: -len(OUTPUT_SUFFIXES["mask"])], prediction=str(prediction), truth=str(truth),
        truth_kind=kind, downsample=d, grid=(gw, gh), intersection_pixels=inter, predicted_pixels=n_pred,
        truth_pixels=n_truth, dice=_dice(inter, n_pred, n_truth), precision=_ratio(inter, n_pred),
        recall=_ratio(inter, n_truth), dice_small=split["dice_small"], dice_large=split["dice_large"],
        regions_small=split["regions_small"], regions_large=split["regions_large"], split_factor=factor,
        small_region_pixels_at_split=small_at_split, model=model, warnings=warnings)


def _split_mean(rows: list, key: str, regions: str) -> float | None:
    """Mean of a split's Dice over the slides where it has a truth region or a prediction (a split with
    neither scores 1.0 in `dice_by_size` and would only inflate the mean)."""
    values = [getattr(r, key) for r in rows if not (getattr(r, regions) == 0 and getattr(r, key) == 1.0)]
    return None if not values else float(np.mean(values))


def summarise(rows: list) -> dict:
    """Pooled pixel scores (all slides' pixels as one) and means over slides."""
    inter = sum(r.intersection_pixels for r in rows)
    pred = sum(r.predicted_pixels for r in rows)
    truth = sum(r.truth_pixels for r in rows)
    return {"slides": len(rows), "pooled_dice": _dice(inter, pred, truth),
            "pooled_precision": _ratio(inter, pred),
            "pooled_recall": _ratio(inter, truth), "mean_dice": float(np.mean([r.dice for r in rows])),
            "mean_dice_small": _split_mean(rows, "dice_small", "regions_small"),
            "mean_dice_large": _split_mean(rows, "dice_large", "regions_large"),
            "intersection_pixels": inter, "predicted_pixels": pred, "truth_pixels": truth,
            "regions_small": sum(r.regions_small for r in rows),
            "regions_large": sum(r.regions_large for r in rows)}


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.2f}"


def markdown(out_dir: Path, rows: list, summary: dict, unmatched: dict, small_region_pixels: float) -> str:
    models = sorted({r.model for r in rows if r.model})
    lines = [f"# Evaluation of {out_dir}", "",
             ("Scores in %, on the grid of each predicted mask (the resolution `fastgicn segment` read); "
              f"XS/XL: 8-connected truth regions under {small_region_pixels:g} grid pixels are small (paper, "
              "Table 4)."),
             "", "| slide | truth | grid (px) | Dice | precision | recall | XS Dice | XL Dice | XS / XL "
                 "regions |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        split = "" if r.split_factor == 1 else f" (at 1/{r.split_factor})"
        # a split with neither truth nor prediction scores 1.0 in dice_by_size; it is shown as n/a
        small = None if (r.regions_small, r.dice_small) == (0, 1.0) else r.dice_small
        large = None if (r.regions_large, r.dice_large) == (0, 1.0) else r.dice_large
        lines.append(f"| {r.slide} | {Path(r.truth).name} | {r.grid[0]}x{r.grid[1]} | {_pct(r.dice)} | "
                     f"{_pct(r.precision)} | {_pct(r.recall)} | {_pct(small)}{split} | "
                     f"{_pct(large)}{split} | {r.regions_small} / {r.regions_large} |")
    s = summary
    n = f"{s['slides']} slide" + ("s" if s["slides"] != 1 else "")
    lines.append(f"| **mean over {n}** | | | {_pct(s['mean_dice'])} | | | "
                 f"{_pct(s['mean_dice_small'])} | {_pct(s['mean_dice_large'])} | |")
    lines.append(f"| **pooled (all pixels)** | | | {_pct(s['pooled_dice'])} | {_pct(s['pooled_precision'])} "
                 f"| {_pct(s['pooled_recall'])} | | | {s['regions_small']} / {s['regions_large']} |")
    ours = ", ".join(f"{m} (cf. the paper's {PAPER_NAME[m]})" if m in PAPER_NAME else m for m in models) or \
        "the model of the reports"
    lines += ["", "## Beside the paper's published figures (the paper's models, on the paper's data)",
              "",
              "| model | data | Dice (Table 1) | XS Dice (Table 4) | XL Dice (Table 4) |",
              "| --- | --- | ---: | ---: | ---: |"]
    for name, dice in PAPER_TABLE1.items():
        xs, xl = PAPER_TABLE4[name]
        lines.append(f"| {name} (paper) | paper: Camelyon16 (T1), gastric section (T4) | {dice:.2f} | "
                     f"{xs:.2f} | {xl:.2f} |")
    lines.append(f"| **{ours} (this run)** | {n} | {_pct(s['mean_dice'])} | "
                 f"{_pct(s['mean_dice_small'])} | {_pct(s['mean_dice_large'])} |")
    lines += ["", ("Paper: Qin et al. 2018, Table 1 (Camelyon16, 2 test slides) and Table 4 (printed in "
                   "section 4.2, Gastric WSIs Data; the test set is not named). Our row is the mean over "
                   "slides; a split with neither truth nor prediction on a slide is left out of its mean.")]
    if unmatched["predictions"] or unmatched["truths"]:
        lines += ["", "Not evaluated: " + "; ".join(
            [f"no truth for {', '.join(unmatched['predictions'])}"] * bool(unmatched["predictions"]) +
            [f"no prediction for {', '.join(unmatched['truths'])}"] * bool(unmatched["truths"]))]
    return "\n".join(lines) + "\n"


CSV_FIELDS = ("slide", "truth", "truth_kind", "downsample", "grid_width", "grid_height",
              "intersection_pixels",
              "predicted_pixels", "truth_pixels", "dice", "precision", "recall", "dice_small", "dice_large",
              "regions_small", "regions_large", "split_factor", "model")


def csv_text(rows: list, summary: dict) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_FIELDS)
    for r in rows:
        d = asdict(r)
        d["grid_width"], d["grid_height"] = r.grid
        w.writerow(["" if d[k] is None else d[k] for k in CSV_FIELDS])
    pooled = {"slide": "POOLED", "intersection_pixels": summary["intersection_pixels"],
              "predicted_pixels": summary["predicted_pixels"], "truth_pixels": summary["truth_pixels"],
              "dice": summary["pooled_dice"], "precision": summary["pooled_precision"],
              "recall": summary["pooled_recall"], "regions_small": summary["regions_small"],
              "regions_large": summary["regions_large"]}
    mean = {"slide": "MEAN", "dice": summary["mean_dice"], "dice_small": summary["mean_dice_small"],
            "dice_large": summary["mean_dice_large"]}
    for extra in (mean, pooled):
        w.writerow(["" if extra.get(k) is None else extra[k] for k in CSV_FIELDS])
    return buf.getvalue()


def _write_text(path: Path, text: str) -> None:
    from .outputs.atomic import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def evaluate(out_dir, truths, *, rules: dict | None = None, small_region_pixels: float = 50_000,
             max_split_pixels: int = MAX_SPLIT_PIXELS, log=None) -> dict:
    """Score every NAME.tumour_mask.tif in `out_dir` that has a truth among `truths` (files or folders) and
    write evaluation.md / .csv / .json there; returns the JSON's dict (with "markdown")."""
    from .outputs.atomic import write_json

    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise ConfigError(f"{out_dir}: no such output directory; give the OUTDIR of fastgicn segment")
    if not (small_region_pixels > 0 and math.isfinite(small_region_pixels)):
        raise ConfigError(f"--small-region-pixels {small_region_pixels}: use a positive number (paper: "
                          "50000)")
    suffix = OUTPUT_SUFFIXES["mask"]
    predictions = {p.name[: -len(suffix)]: p for p in sorted(out_dir.glob(f"*{suffix}"))}
    if not predictions:
        raise ConfigError(f"{out_dir}: holds no *{suffix}: run fastgicn segment -o {out_dir} first")
    truth_files = find_truths(truths)
    matched = sorted(set(predictions) & set(truth_files))
    unmatched = {"predictions": sorted(set(predictions) - set(truth_files)),
                 "truths": sorted(set(truth_files) - set(predictions))}
    if not matched:
        raise ConfigError("no truth matches a prediction by name: predictions "
                          f"{', '.join(sorted(predictions))}; truths "
                          f"{', '.join(sorted(truth_files)) or 'none'} (NAME.mask.tif, NAME.xml or "
                          "NAME.geojson for NAME.tumour_mask.tif)")
    rows = []
    started = time.perf_counter()
    for stem in matched:
        report_path = out_dir / f"{stem}{OUTPUT_SUFFIXES['report']}"
        try:
            report = json.loads(report_path.read_text())
        except (OSError, ValueError):
            report = None
        row = evaluate_slide(predictions[stem], truth_files[stem], report=report, rules=rules,
                             small_region_pixels=small_region_pixels, max_split_pixels=max_split_pixels)
        for warning in row.warnings:
            if log:
                log(f"warning: {warning}")
        rows.append(row)
    summary = summarise(rows)
    text = markdown(out_dir, rows, summary, unmatched, small_region_pixels)
    result = {"format": "fastgicn-evaluation-1", "out_dir": str(out_dir), "slides": [asdict(r) for r in rows],
              "summary": summary, "unmatched": unmatched, "small_region_pixels": small_region_pixels,
              "resolution": "the grid of each predicted mask (report read.downsample level-0 pixels per "
                            "pixel); XS/XL on that grid coarsened by split_factor",
              "paper": {"source": "Qin et al. 2018 (the paper's models on the paper's data, not ours)",
                        "table1_camelyon16_dice_percent": PAPER_TABLE1,
                        "table4_xs_xl_dice_percent": {k: {"xs": v[0], "xl": v[1]}
                                                      for k, v in PAPER_TABLE4.items()},
                        "table4_note": "printed in section 4.2 (Gastric WSIs Data); the test set is not "
                                       "named"},
              "seconds": round(time.perf_counter() - started, 3)}
    _write_text(out_dir / EVALUATION_NAMES[1], csv_text(rows, summary))
    write_json(out_dir / EVALUATION_NAMES[2], result)
    _write_text(out_dir / EVALUATION_NAMES[0], text)
    result["markdown"] = text
    return result
