"""What a fragmented model output costs the slide flow: the same slide with an all-normal and a fragmented
zero-cost model, interleaved, in one run.

Both models cost nothing on the device (they return precomputed logits), so the difference is the host's
work on the output: stitching, TIFF encoding of a noisy instead of a uniform map, polygons and GeoJSON. The
fragmented output repeats a 512^2 pattern of thresholded fine noise in every tile (~90 islands per tile,
many with holes; tens of thousands over a slide). Also checks what the GeoJSON holds: every polygon valid
(shapely) and the polygons' area against the tumour area of the mask it was traced from.

    python bench/bench_fragmented.py                 # writes bench/results/fragmented_cpu.json
    python bench/bench_fragmented.py --size 8192 --repeats 1 --out -
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage
from machine import cpu_name  # bench/machine.py: run these scripts as python bench/NAME.py


class ConstantLogits(torch.nn.Module):
    """A zero-cost segmentation model: the same logits for every tile (N x 2 x T x T)."""

    def __init__(self, tumour: np.ndarray):
        super().__init__()
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]))
        t = torch.from_numpy(np.where(tumour, 4.0, -4.0).astype(np.float32))
        self.register_buffer("logits", torch.stack([-t, t])[None])
        self.model_name, self.model_kwargs = "constant_logits", {}

    def forward(self, x):
        return self.logits.expand(x.shape[0], -1, -1, -1)


def fragmented_tile(side: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.random((side, side), np.float32), 2.7)
    return field > np.quantile(field, 0.62)


def run_once(slide, model, config, out_dir, threads, min_region_um2):
    """The report of one run, and the CPU seconds of this process (every thread) during it."""
    from fastgicn import segment_slide

    t0 = os.times()
    res = segment_slide(slide, out_dir, model, config, "cpu", threads=threads, progress=False,
                        min_region_um2=min_region_um2)
    t1 = os.times()
    return res.report, (t1.user - t0.user) + (t1.system - t0.system)


def geojson_check(path: Path, mask_tumour_l0_px: float) -> dict:
    import shapely
    from shapely.geometry import shape

    features = json.loads(path.read_text())["features"]
    geoms = [shape(f["geometry"]) for f in features]
    area = float(sum(g.area for g in geoms))
    return {"features": len(features), "invalid": int(sum(not shapely.is_valid(g) for g in geoms)),
            "polygon_area_l0_px": area, "mask_area_l0_px": mask_tumour_l0_px,
            "area_ratio": area / mask_tumour_l0_px if mask_tumour_l0_px else None}


def main(argv=None) -> int:
    from fastgicn import __version__
    from fastgicn.config import TileConfig
    from fastgicn.synth import write_synthetic_slide

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=16384, help="level-0 side of the synthetic slide (0.25 um/px)")
    ap.add_argument("--tile", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--min-region-um2", type=float, default=None,
                    help="the GeoJSON's speck filter (default: segment's, 100 um^2; 0 keeps every region)")
    ap.add_argument("--out", default="bench/results/fragmented_cpu.json", help="JSON file, or - for stdout")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from fastgicn.outputs.polygons import DEFAULT_MIN_REGION_UM2

    min_region = DEFAULT_MIN_REGION_UM2 if args.min_region_um2 is None else args.min_region_um2
    config = TileConfig(tile_size=args.tile, target_mpp=0.5, min_tissue_fraction=0.0, tissue_prefilter=False,
                        batch_size=8)
    models = {"all_normal": ConstantLogits(np.zeros((args.tile, args.tile), bool)),
              "fragmented": ConstantLogits(fragmented_tile(args.tile))}
    runs: dict[str, list[dict]] = {k: [] for k in models}
    with tempfile.TemporaryDirectory(dir=".") as work:
        work = Path(work)
        slide, _ = write_synthetic_slide(work / "dense.svs", args.size, args.size, seed=1)
        for r in range(args.repeats):
            for name, model in models.items():
                out = work / f"{name}_{r}"
                rep, cpu = run_once(slide, model, config, out, args.threads, min_region)
                row = {"seconds": rep["seconds"], "cpu_seconds": round(cpu, 3), "tiles": rep["tiles"]["segmented"],
                       "regions": rep["tumour"]["regions"]}
                if name == "fragmented" and r == 0:
                    row["geojson"] = geojson_check(out / "dense.tumour.geojson",
                                                   rep["tumour"]["pixels"] * rep["read"]["downsample"] ** 2)
                    row["small_regions_dropped"] = rep["tumour"].get("small_regions_dropped")
                    row["summary_downsample_l0"] = rep["memory"]["summary_downsample"] * rep["read"]["downsample"]
                runs[name].append(row)
                print(f"{name} repeat {r}: {rep['seconds']['total']:.2f} s, {row['regions']} regions",
                      file=sys.stderr)
    med = {k: statistics.median(x["seconds"]["total"] for x in v) for k, v in runs.items()}
    stages = sorted({s for v in runs.values() for x in v for s in x["seconds"]})
    result = {
        "bench": "fragmented model output vs all-normal, zero-cost models, same slide, interleaved",
        "command": "python " + " ".join([sys.argv[0]] + sys.argv[1:]),
        "machine": {"cpu": cpu_name(), "cores_usable": len(os.sched_getaffinity(0)),
                    "load_average": os.getloadavg()},
        "versions": {"fastgicn": __version__, "torch": torch.__version__, "numpy": np.__version__,
                     "python": platform.python_version()},
        "slide": {"size": args.size, "mpp": 0.25, "layout": "aperio", "read_mpp": 0.5, "tile": args.tile},
        "min_region_um2": min_region,
        "median_total_seconds": med,
        "fragmented_over_normal": med["fragmented"] / med["all_normal"],
        # CPU seconds of the process (all threads) per run: on a machine with few cores, how close the flow is
        # to using every core (cpu / wall near the core count: CPU-bound)
        "median_cpu_seconds": {k: statistics.median(x["cpu_seconds"] for x in v) for k, v in runs.items()},
        "median_stage_seconds": {k: {s: statistics.median(x["seconds"].get(s, 0.0) for x in v) for s in stages}
                                 for k, v in runs.items()},
        "runs": runs,
    }
    text = json.dumps(result, indent=2)
    if args.out == "-":
        print(text)
    else:
        Path(args.out).write_text(text + "\n")
        print(f"fragmented / all-normal = {result['fragmented_over_normal']:.2f} -> {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
