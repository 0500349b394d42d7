"""Time the polygon step (reduced mask -> valid polygons -> GeoJSON) on fragmented, smooth and empty masks.

The fragmented mask stands in for a model that fires in specks: thresholded fine noise at 4096 x 4096 gives
about 24,000 8-connected islands, many with holes (the size of the reduced mask of a large slide). The
smooth one is a few large blobs, the empty one an all-normal slide. A measurement, not a test: medians of
`--repeats` runs of `tumour_geojson` (contours, repair, small-region filter at 100 um^2, GeoJSON dict) and
of `write_geojson`, with counts of regions, holes and polygons repaired, and a shapely validity check.

    python bench/bench_polygons.py                   # writes bench/results/polygons_cpu.json
    python bench/bench_polygons.py --side 2048 --repeats 1 --out -
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy import ndimage
from machine import cpu_name  # bench/machine.py: run these scripts as python bench/NAME.py


def fragmented_mask(side: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.random((side, side), np.float32), 2.7)
    return field > np.quantile(field, 0.62)


def smooth_mask(side: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.random((side // 8, side // 8), np.float32), 12)
    small = field > np.quantile(field, 0.7)
    return np.kron(small, np.ones((8, 8), bool))[:side, :side]


def main(argv=None) -> int:
    import cv2
    import shapely

    from fastgicn import __version__
    from fastgicn.outputs.geojson import tumour_geojson, write_geojson

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--side", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--scale", type=float, default=16.0, help="level-0 pixels per mask pixel")
    ap.add_argument("--mpp", type=float, default=0.25, help="level-0 um/px")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "polygons_cpu.json"))
    args = ap.parse_args(argv)

    masks = {"all_normal": np.zeros((args.side, args.side), bool), "smooth": smooth_mask(args.side),
             "fragmented": fragmented_mask(args.side)}
    cases = {}
    clip = (args.side * args.scale, args.side * args.scale)
    for name, mask in masks.items():
        islands = ndimage.label(mask, np.ones((3, 3)))[1]
        times, write_times = [], []
        with tempfile.TemporaryDirectory() as tmp:
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                coll, info = tumour_geojson(mask, args.scale, clip=clip, mpp=args.mpp, slide_name="bench")
                times.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                path = write_geojson(Path(tmp) / "t.geojson", coll)
                write_times.append(time.perf_counter() - t0)
            size = path.stat().st_size
        geoms = [shapely.geometry.shape(f["geometry"]) for f in json.loads(coll)["features"]]
        cases[name] = {
            "mask_pixels": int(mask.sum()), "islands_8connected": int(islands),
            "regions_kept": info["kept"], "regions_dropped": info["dropped"], "repaired": info["repaired"],
            "holes": int(sum(len(p.interiors) for g in geoms for p in getattr(g, "geoms", [g]))),
            "invalid_after": int(sum(not g.is_valid for g in geoms)),
            "seconds_polygons_median": round(statistics.median(times), 4),
            "seconds_write_median": round(statistics.median(write_times), 4),
            "geojson_bytes": size,
        }
        print(name, cases[name], flush=True)
    result = {
        "benchmark": "polygons: reduced mask -> OpenCV contours (2x upsampled, pixel edges) -> valid shapely "
                     "polygons -> small-region filter -> GeoJSON",
        "command": "python bench/bench_polygons.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {"cpu": cpu_name(), "logical_cpus": os.cpu_count(),
                    "platform": platform.platform(), "load_average_1min": round(os.getloadavg()[0], 2),
                    "note": "shared machine: other engineers' jobs may run on the same cores"},
        "versions": {"python": platform.python_version(), "numpy": np.__version__, "opencv": cv2.__version__,
                     "shapely": shapely.__version__, "geos": ".".join(map(str, shapely.geos_version)),
                     "fastgicn": __version__},
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "side": args.side, "scale": args.scale, "mpp": args.mpp, "repeats": args.repeats,
        "cases": cases,
    }
    text = json.dumps(result, indent=2) + "\n"
    if args.out == "-":
        print(text)
    else:
        Path(args.out).write_text(text)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
