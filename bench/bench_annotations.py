"""Benchmark annotations -> mask: seconds and peak RSS to rasterise 1,000 polygons onto a 100,000^2 slide.

The slide is a stand-in: only its dimensions and MPP (0.25 um/px) are used, as `fastgicn mask` uses a real
slide's, so no 100,000^2 slide is written; the mask TIFF itself is written for real (deflate, 2x2-majority
pyramid, to a temporary directory). The polygons are random wobbly stars of 256 vertices (radii 100-1500 px,
one in five with a hole), written as ASAP XML and QuPath GeoJSON so the parse is timed too. Also measured:
rasterising alone (no TIFF), and how many pixels OpenCV's fillPoly (with `shift`) paints differently from
the pixel-centre rule on small random polygons (why it is not the engine).

    python bench/bench_annotations.py                    # writes bench/results/annotations_cpu.json
    python bench/bench_annotations.py --side 20000 --polygons 200 --out -
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from bench_tiler import _context, _write  # noqa: E402
from rss import RssSampler, status_kib  # noqa: E402

from fastgicn.annotations import Annotations, MaskRenderer, Region, read_annotations, write_mask  # noqa: E402


def random_regions(side: int, count: int, vertices: int, seed: int = 0) -> list[Region]:
    rng = np.random.default_rng(seed)
    regions = []
    for i in range(count):
        angles = np.sort(rng.random(vertices)) * 2 * np.pi
        r0 = rng.uniform(100, 1500)
        radii = r0 * (1 + 0.3 * np.sin(5 * angles + rng.random() * 6)) * rng.uniform(0.9, 1.1, vertices)
        cx, cy = rng.uniform(0, side, 2)
        rings = [np.c_[cx + radii * np.cos(angles), cy + radii * np.sin(angles)]]
        if i % 5 == 0:
            a = np.linspace(0, 2 * np.pi, 32, endpoint=False)
            rings.append(np.c_[cx + 0.3 * r0 * np.cos(a), cy + 0.3 * r0 * np.sin(a)])
        regions.append(Region(f"Annotation {i}", "Tumor", tuple(rings)))
    return regions


def asap_xml(regions) -> str:
    out = ['<?xml version="1.0"?>', "<ASAP_Annotations>", "<Annotations>"]
    for r in regions:
        out.append(f'<Annotation Name="{r.name}" Type="Polygon" PartOfGroup="Tumor" Color="#F4FA58">'
                   "<Coordinates>")
        out += [f'<Coordinate Order="{k}" X="{x:.3f}" Y="{y:.3f}" />' for k, (x, y) in enumerate(r.rings[0])]
        out.append("</Coordinates></Annotation>")
    out += ["</Annotations>", '<AnnotationGroups><Group Name="Tumor" PartOfGroup="None" />',
            "</AnnotationGroups>", "</ASAP_Annotations>"]
    return "\n".join(out)


def geojson(regions) -> str:
    features = [{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [
        np.round(np.vstack([ring, ring[:1]]), 3).tolist() for ring in r.rings]},
        "properties": {"objectType": "annotation", "classification": {"name": "Tumor"}}} for r in regions]
    return json.dumps({"type": "FeatureCollection", "features": features})


def opencv_disagreement(polygons: int = 200, seed: int = 0) -> dict:
    """Pixels where cv2.fillPoly (shift 8, vertices moved by -0.5 so integers are pixel centres) and the
    pixel-centre rule disagree, over random polygons of radius 5-30 px."""
    import cv2

    rng = np.random.default_rng(seed)
    differ = inside = 0
    for _ in range(polygons):
        regions = random_regions(100, 1, int(rng.integers(3, 12)), int(rng.integers(1 << 30)))
        ring = regions[0].rings[0]
        ring = (ring - ring.mean(0)) * rng.uniform(0.005, 0.02) + 50
        ours = MaskRenderer(Annotations("cv", [Region("p", None, (ring,))])).render(0, 0, 100, 100) > 0
        cvm = np.zeros((100, 100), np.uint8)
        cv2.fillPoly(cvm, [np.round((ring - 0.5) * 256).astype(np.int32)], 255, shift=8)
        differ += int(((cvm > 0) != ours).sum())
        inside += int(ours.sum())
    return {"polygons": polygons, "pixels_inside_by_centre_rule": inside, "pixels_differing": differ,
            "differing_percent_of_inside": round(100 * differ / max(inside, 1), 2)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--side", type=int, default=100_000)
    ap.add_argument("--polygons", type=int, default=1000)
    ap.add_argument("--vertices", type=int, default=256)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "annotations_cpu.json"))
    args = ap.parse_args(argv)

    regions = random_regions(args.side, args.polygons, args.vertices)
    record = {"benchmark": "annotations -> level-0 mask TIFF (fastgicn.annotations)", **_context(argv, __file__),
              "slide": f"stand-in: {args.side}x{args.side} level-0 pixels, 0.25 um/px (dimensions and MPP "
                       "only; no slide file is written)",
              "polygons": args.polygons, "vertices_per_outline": args.vertices,
              "holes": (args.polygons + 4) // 5}
    with tempfile.TemporaryDirectory(dir=ROOT / "bench") as tmp:
        tmp = Path(tmp)
        (tmp / "a.xml").write_text(asap_xml(regions))
        (tmp / "a.geojson").write_text(geojson(regions))
        parse = {}
        for name in ("a.xml", "a.geojson"):
            t0 = time.perf_counter()
            ann = read_annotations(tmp / name)
            parse[name.split(".")[1]] = {"seconds": round(time.perf_counter() - t0, 3),
                                         "megabytes": round((tmp / name).stat().st_size / 1e6, 2),
                                         "tumour_polygons": len(ann.tumour)}
        record["parse"] = parse
        ann = Annotations(tmp / "a.geojson", regions)

        rss_before = status_kib("VmRSS")
        sampler = RssSampler(0.1)
        sampler.start()
        t0, cpu0 = time.perf_counter(), time.process_time()
        written = write_mask(tmp / "mask.tif", ann, args.side, args.side, mpp=0.25)
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        sampler.stop()
        record["write_mask"] = {
            "wall_seconds": round(wall, 2), "cpu_seconds": round(cpu, 2),
            "rasterise_seconds_on_the_main_thread": round(written.rasterise_seconds, 2),
            "tumour_pixels": written.tumour_pixels,
            "tumour_fraction": round(written.tumour_pixels / args.side ** 2, 4),
            "mask_megabytes": round((tmp / "mask.tif").stat().st_size / 1e6, 2),
            "rss_before_mib": round(rss_before / 1024, 1),
            "peak_rss_mib_sampled": round(sampler.peak_kib / 1024, 1),
            "peak_rss_mib_vmhwm": round(status_kib("VmHWM") / 1024, 1),
            "peak_rss_mib_getrusage": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "full_size_array_mib": round(args.side ** 2 / 2 ** 20, 1),
        }
    print(f"write_mask {args.side}^2, {args.polygons} polygons: {wall:.1f} s wall, peak RSS "
          f"{sampler.peak_kib / 1024:.0f} MiB (a full-size array would be {args.side ** 2 / 2 ** 20:.0f} "
          "MiB)")

    renderer = MaskRenderer(ann)
    band = np.zeros((256, args.side), np.uint8)
    t0 = time.perf_counter()
    for y0 in range(0, args.side, 256):
        rows = band[:min(256, args.side - y0)]
        rows[:] = 0
        renderer.render_into(rows, 0, y0)
    record["rasterise_only_seconds"] = round(time.perf_counter() - t0, 2)
    record["opencv_fillpoly_vs_centre_rule"] = opencv_disagreement()
    print(f"rasterise alone {record['rasterise_only_seconds']} s; cv2.fillPoly differs on "
          f"{record['opencv_fillpoly_vs_centre_rule']['differing_percent_of_inside']} % of inside pixels")
    _write(record, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
