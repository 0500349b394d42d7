"""Benchmark many slides on one machine: the idle gap of the model between slides, plain serial against
prefetching (`segment_slides(overlap=False)` / the default), and slides/hour and tiles/s for 1 and 2 Ray CPU
workers (`fastgicn.distributed.ClusterRun`, one torch thread each) on a local Ray instance.

    python bench/bench_cluster.py                          # 8 slides 2048 x 1536, 256-px tiles, width 1/8
    python bench/bench_cluster.py --slides 4 --size 1024x768 --out -

The gap between two slides is the wall time from the end of the last forward of one slide to the start of the
first forward of the next (`SlideResult.forward_window`; in a Ray run the same windows from the run summary,
per worker); medians over the slide pairs, and the model's idle fraction: summed gaps over the span from the
first forward to the last. The model is the paper's network at a reduced width (`--width`) so a CPU run takes
seconds per slide; the plain runs use one torch thread, like one CPU worker. Writes
bench/results/cluster_cpu.json.
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from bench_tiler import _context, _write  # noqa: E402


def gaps(windows: list) -> dict:
    """Idle gaps of one device between consecutive slides, from (first forward start, last forward end)."""
    windows = sorted(w for w in windows if w and w[0] is not None)
    between = [b[0] - a[1] for a, b in itertools.pairwise(windows)]
    span = windows[-1][1] - windows[0][0] if windows else 0.0
    return {"pairs": len(between), "median_gap_s": round(statistics.median(between), 4) if between else None,
            "max_gap_s": round(max(between), 4) if between else None,
            "idle_fraction": round(sum(between) / span, 4) if span > 0 else None}


def span_rate(tiles: int, windows: list) -> float:
    """Tiles per second from the first forward to the last (leaves out starting Ray and the workers)."""
    windows = [w for w in windows if w and w[0] is not None]
    span = max(w[1] for w in windows) - min(w[0] for w in windows)
    return round(tiles / span, 2)


def plain(slides, out, model, config, overlap: bool) -> dict:
    from fastgicn.pipeline import segment_slides

    t0 = time.perf_counter()
    results = segment_slides(slides, out, model, config, overlap=overlap, progress=False, log=lambda m: None)
    seconds = time.perf_counter() - t0
    assert all(r.status == "done" for r in results), [r.error for r in results]
    tiles = sum(r.report["tiles"]["segmented"] for r in results)
    return {"seconds": round(seconds, 2), "tiles": tiles, "tiles_per_second": round(tiles / seconds, 2),
            "slides_per_hour": round(len(slides) * 3600 / seconds, 1),
            "tiles_per_second_first_to_last_forward": span_rate(tiles, [r.forward_window for r in results]),
            "gap": gaps([r.forward_window for r in results])}


def cluster(slides, out, model, config, workers: int) -> dict:
    from fastgicn.distributed import RUN_SUMMARY_NAME, ClusterRun

    t0 = time.perf_counter()
    results = ClusterRun(slides, out, model, config, workers=workers, cpus_per_worker=1, progress=False,
                         log=lambda m: None).run()
    seconds = time.perf_counter() - t0
    assert all(r.status == "done" for r in results), [r.error for r in results]
    summary = json.loads((Path(out) / RUN_SUMMARY_NAME).read_text())
    per_worker: dict[str, list] = {}
    for s in summary["slides"]:
        per_worker.setdefault(s["worker"], []).append(s["forward_window"])
    return {"seconds_with_worker_start": round(seconds, 2), "seconds": summary["seconds"],
            "tiles": summary["tiles"], "tiles_per_second": summary["tiles_per_second"],
            "slides_per_hour": summary["slides_per_hour"],
            "tiles_per_second_first_to_last_forward": span_rate(
                summary["tiles"], [s["forward_window"] for s in summary["slides"]]),
            "slides_per_worker": {w: len(v) for w, v in per_worker.items()},
            "gap_within_a_worker": {w: gaps(v) for w, v in per_worker.items()}}


def main(argv: list[str] | None = None) -> dict:
    import ray
    import torch

    from fastgicn.config import TileConfig
    from fastgicn.models import create_model
    from fastgicn.synth import write_synthetic_slide

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--slides", type=int, default=8)
    p.add_argument("--size", default="2048x1536", help="WIDTHxHEIGHT of each synthetic slide")
    p.add_argument("--tile", type=int, default=256)
    p.add_argument("--width", type=float, default=0.125, help="channel multiplier of the network")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "cluster_cpu.json"))
    args = p.parse_args(argv)
    w, h = (int(v) for v in args.size.lower().split("x"))
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = create_model("resnet50_gicn_gpp", width=args.width)
    config = TileConfig(tile_size=args.tile, overlap=32, level=0, batch_size=4)
    record = {"benchmark": "many slides on one machine: the model's idle gap between slides (end of the last "
                           "forward of one slide to the first forward of the next; medians over slide pairs) "
                           "and slides/hour, tiles/s; plain runs on one torch thread, Ray CPU workers one "
                           "each",
              **_context(argv, __file__)}
    given = argv if argv is not None else sys.argv[1:]
    record["command"] = " ".join(["python bench/bench_cluster.py", *given])
    with tempfile.TemporaryDirectory() as d:
        slides = [write_synthetic_slide(Path(d) / f"s{i}.svs", w, h, seed=i, min_level_size=512)[0]
                  for i in range(args.slides)]
        record.update(slides=args.slides, slide_size=[w, h], config=config.to_dict(),
                      model=f"resnet50_gicn_gpp(width={args.width})")
        runs = {}
        runs["plain_serial"] = plain(slides, Path(d) / "serial", model, config, overlap=False)
        print("plain serial", runs["plain_serial"])
        runs["plain_prefetching"] = plain(slides, Path(d) / "overlap", model, config, overlap=True)
        print("plain prefetching", runs["plain_prefetching"])
        ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, object_store_memory=200 * 2 ** 20,
                 log_to_driver=False)
        try:
            for n in (1, 2):
                runs[f"ray_{n}_cpu_workers"] = cluster(slides, Path(d) / f"ray{n}", model, config, n)
                print(f"ray {n} workers", runs[f"ray_{n}_cpu_workers"])
        finally:
            ray.shutdown()
    serial, pre = runs["plain_serial"]["gap"], runs["plain_prefetching"]["gap"]
    record["runs"] = runs
    record["summary"] = {
        "median_gap_serial_s": serial["median_gap_s"], "median_gap_prefetching_s": pre["median_gap_s"],
        "idle_fraction_serial": serial["idle_fraction"], "idle_fraction_prefetching": pre["idle_fraction"],
        "tiles_per_second_2_workers_over_1": round(runs["ray_2_cpu_workers"]["tiles_per_second"]
                                                    / runs["ray_1_cpu_workers"]["tiles_per_second"], 2),
        "slides_per_hour": {k: v["slides_per_hour"] for k, v in runs.items()},
        "tiles_per_second": {k: v["tiles_per_second"] for k, v in runs.items()}}
    versions = record["versions"]
    versions["torch"], versions["ray"] = torch.__version__, ray.__version__
    print(record["summary"])
    return _write(record, args.out)


if __name__ == "__main__":
    main()
