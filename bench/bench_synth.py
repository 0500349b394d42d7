"""Benchmark: write synthetic slides of growing area and show that memory stays bounded.

Each size runs in its own child process (peak RSS is per process), which writes the slide and its mask with
`fastgicn.synth.write_synthetic_slide` into a temporary directory, measures wall time, peak RSS
(`resource.getrusage(RUSAGE_SELF).ru_maxrss`, /proc/self/status VmHWM, and VmRSS sampled every 0.1 s in a
thread), the file sizes and the pyramid as OpenSlide sees it, then deletes the files (unless --keep).

    nice -n 19 python bench/bench_synth.py --sizes 20000 100000 --json bench/results/synth_100k.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rss import RssSampler, status_kib  # bench/rss.py: run these scripts as python bench/NAME.py
from machine import cpu_name  # bench/machine.py: run these scripts as python bench/NAME.py


def child(size: int, seed: int, fmt: str, out_dir: Path, keep: bool) -> dict:
    import numpy as np
    import openslide

    from fastgicn.outputs import tiff as pyramid_tiff
    from fastgicn.synth import write_synthetic_slide

    timings: list[float] = []
    real_write = pyramid_tiff.write_pyramid

    def timed_write(*args, **kwargs):  # split the time between the mask and the slide
        t0 = time.perf_counter()
        try:
            return real_write(*args, **kwargs)
        finally:
            timings.append(time.perf_counter() - t0)

    pyramid_tiff.write_pyramid = timed_write
    rss_before_kib = status_kib("VmRSS")
    sampler = RssSampler(interval=0.1)
    sampler.start()
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    slide_path, mask_path = write_synthetic_slide(out_dir / f"synth_{size}.{fmt}", size, size, seed=seed)
    wall = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    sampler.stop()
    result = {
        "width": size, "height": size, "seed": seed, "format": fmt,
        "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
        "mask_wall_s": round(timings[0], 1), "slide_wall_s": round(timings[1], 1),
        "megapixels_per_s": round(size * size / wall / 1e6, 2),
        "rss_before_write_mib": round(rss_before_kib / 1024, 1),
        "peak_rss_mib_getrusage": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "peak_rss_mib_vmhwm": round(status_kib("VmHWM") / 1024, 1),
        "peak_rss_mib_sampled": round(sampler.peak_kib / 1024, 1), "rss_samples": sampler.samples,
        "slide_bytes": slide_path.stat().st_size, "mask_bytes": mask_path.stat().st_size,
        "raw_rgb_bytes": size * size * 3,
    }
    s = openslide.OpenSlide(slide_path)
    m = openslide.OpenSlide(mask_path)
    result["openslide"] = {
        "vendor": s.properties["openslide.vendor"], "level_dimensions": s.level_dimensions,
        "mpp_x": s.properties.get("openslide.mpp-x"),
        "objective_power": s.properties.get("openslide.objective-power"),
        "mask_level_dimensions": m.level_dimensions,
    }
    # a read in the middle, to show the file is complete and readable
    region = np.asarray(s.read_region((size // 2, size // 2), 0, (512, 512)))
    result["openslide"]["center_region_mean"] = round(float(region[..., :3].mean()), 2)
    s.close()
    m.close()
    if not keep:
        slide_path.unlink()
        mask_path.unlink()
    return result


def machine() -> dict:
    import imagecodecs
    import numpy as np
    import openslide
    import tifffile

    cpu = cpu_name()
    return {
        "cpu": cpu, "logical_cpus": os.cpu_count(), "usable_cpus": len(os.sched_getaffinity(0)),
        "load_average_at_start": os.getloadavg(), "platform": platform.platform(),
        "python": platform.python_version(), "numpy": np.__version__, "tifffile": tifffile.__version__,
        "imagecodecs": imagecodecs.__version__, "openslide_python": openslide.__version__,
        "openslide": openslide.__library_version__,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[20000, 100000], help="square slide sides")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fmt", choices=["svs", "tif"], default="svs")
    p.add_argument("--out-dir", type=Path, default=None, help="where to write (default: a new temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the written files")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.child is not None:
        print(json.dumps(child(args.child, args.seed, args.fmt, args.out_dir, args.keep)))
        return 0

    out_dir = args.out_dir or Path(tempfile.mkdtemp(prefix="fastgicn-bench-synth-"))
    record = {"command": " ".join([Path(sys.executable).name] + sys.argv), "machine": machine(),
              "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "runs": []}
    try:
        for size in args.sizes:
            cmd = [sys.executable, __file__, "--child", str(size), "--seed", str(args.seed),
                   "--fmt", args.fmt, "--out-dir", str(out_dir)] + (["--keep"] if args.keep else [])
            done = subprocess.run(cmd, check=True, capture_output=True, text=True)
            run = json.loads(done.stdout.strip().splitlines()[-1])
            record["runs"].append(run)
            print(f"{size} x {size}: {run['wall_s']} s, peak RSS {run['peak_rss_mib_getrusage']} MiB "
                  f"(sampled {run['peak_rss_mib_sampled']} MiB), slide {run['slide_bytes'] / 1e9:.2f} GB, "
                  f"mask {run['mask_bytes'] / 1e6:.1f} MB", flush=True)
    finally:
        if not args.keep and args.out_dir is None:
            shutil.rmtree(out_dir, ignore_errors=True)
    record["load_average_at_end"] = os.getloadavg()
    record["notes"] = ("wall_s includes waiting for a CPU on a shared machine (see the load averages); cpu_s is "
                       "the child's own CPU time, single-threaded")
    if len(record["runs"]) >= 2:
        small, big = record["runs"][0], record["runs"][-1]
        record["summary"] = {
            "area_ratio": round(big["width"] * big["height"] / (small["width"] * small["height"]), 1),
            "peak_rss_ratio": round(big["peak_rss_mib_getrusage"] / small["peak_rss_mib_getrusage"], 2),
            "note": "memory grows with the slide width (one band of tiles per level), not with its area",
        }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
