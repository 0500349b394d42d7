"""Benchmark the Cython tiler loops against the NumPy references of tests/test_tiler.py.

One thread, one tile at a time, as a reader thread does it: convert a tile to RGB on white, count the
background pixels and write it into a slot of an NHWC batch. Reports the median time per tile, output
GB/s per core and the speed-up over the NumPy reference (the test oracle) and over a NumPy version
tuned for speed (integer, in place); checks the outputs agree before timing anything.

    python bench/bench_tiler.py                      # 512 x 512 tiles, writes bench/results/tiler_cpu.json
    python bench/bench_tiler.py --tile 256 --repeats 50 --out -
    python bench/bench_tiler.py --read                # reading from a JPEG SVS: bench/results/tiler_read.json

`--read` writes a 4096 x 4096 JPEG SVS (3 levels, like tests/slide_fixtures.py) to a temporary folder and
times reading its 64 level-0 tiles of 512 x 512: `Slide.read_into` (libopenslide into a uint32 buffer,
then the Cython loop) against openslide-python's `read_region` (PIL RGBA) composited on white by NumPy,
with 1 and 2 reader threads sharing one handle or holding one each.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

import fastgicn
from fastgicn import _tiler
from machine import cpu_name, median_seconds  # bench/machine.py: run these scripts as python bench/NAME.py

ROOT = Path(__file__).resolve().parents[1]


def _load_references():
    spec = importlib.util.spec_from_file_location("_tiler_refs", ROOT / "tests" / "test_tiler.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _median_seconds(fn, repeats: int, min_time: float = 0.002) -> float:
    """Median over `repeats` samples; each sample loops `fn` long enough to beat timer noise."""
    fn()
    t0 = time.perf_counter()
    fn()
    once = max(time.perf_counter() - t0, 1e-7)
    inner = max(1, int(min_time / once))
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        samples.append((time.perf_counter() - t0) / inner)
    return statistics.median(samples)


def _tuned_numpy(name: str, src: np.ndarray, out: np.ndarray, threshold: int) -> int:
    """NumPy written for speed (uint8/uint16 in place, no float), as a fairer second baseline.

    It trusts that premultiplied channels never exceed alpha (no clamp), which the kernel does not.
    """
    if name == "argb":
        b = src.view(np.uint8).reshape(*src.shape, 4)
        if sys.byteorder == "little":
            np.copyto(out, b[..., 2::-1])
            inv = 255 - b[..., 3:]
        else:
            np.copyto(out, b[..., 1:])
            inv = 255 - b[..., :1]
        out += inv
    elif name == "rgba":
        a = src[..., 3:].astype(np.uint16)
        v = src[..., :3] * a + (255 * (255 - a) + 128)
        v += v >> 8
        v >>= 8
        np.copyto(out, v, casting="unsafe")
    else:
        np.copyto(out, src)
    white = out[..., 0] > threshold
    white &= out[..., 1] > threshold
    white &= out[..., 2] > threshold
    return int(np.count_nonzero(white))




def _has_avx2() -> bool:
    try:
        return " avx2" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tile", type=int, default=512,
                        help="tile side in pixels (default 512, the paper's)")
    parser.add_argument("--repeats", type=int, default=31, help="timed samples per case (median reported)")
    parser.add_argument("--threshold", type=int, default=220)
    parser.add_argument("--read", action="store_true", help="benchmark reading tiles from an SVS instead")
    parser.add_argument("--out", default=None,
                        help="JSON path, or - for stdout only (default bench/results/tiler_cpu.json, or "
                             "tiler_read.json with --read)")
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = str(ROOT / "bench" / "results" / ("tiler_read.json" if args.read else "tiler_cpu.json"))
    if args.read:
        record = bench_read(args)
        record.update(_context(argv))
        return _write(record, args.out)

    refs = _load_references()
    rng = np.random.default_rng(0)
    n = args.tile
    # realistic content: mostly opaque tissue-like colours, a band of glass and a transparent corner
    argb = refs.random_argb(rng, n, n, alpha="opaque")
    argb[: n // 4] = refs.pack_argb(np.full((n // 4, n, 3), 235, np.uint8),
                                    np.full((n // 4, n), 255, np.uint8))
    argb[-n // 8:, -n // 8:] = 0
    rgba = np.ascontiguousarray(argb.view(np.uint8).reshape(n, n, 4)[..., [2, 1, 0, 3]])
    rgb = rgba[..., :3].copy()
    batch = np.empty((4, n, n, 3), np.uint8)
    out_bytes = n * n * 3

    cases = {"argb": (argb, refs.ref_argb), "rgba": (rgba, refs.ref_rgba), "rgb": (rgb, refs.ref_rgb)}
    results = {}
    for name, (src, ref) in cases.items():
        expect_rgb, expect_white = ref(src, args.threshold)
        white = _tiler.to_slot(src, batch, 1, 0, 0, args.threshold)
        if white != expect_white or not np.array_equal(batch[1], expect_rgb):
            raise SystemExit(f"{name}: Cython and NumPy disagree; run pytest tests/test_tiler.py")

        def run_cython(src=src):
            _tiler.to_slot(src, batch, 1, 0, 0, args.threshold)

        def run_numpy(src=src, ref=ref):
            tile, _ = ref(src, args.threshold)
            batch[2] = tile

        def run_tuned(src=src, name=name):
            return _tuned_numpy(name, src, batch[3], args.threshold)

        if run_tuned() != expect_white or not np.array_equal(batch[3], expect_rgb):
            raise SystemExit(f"{name}: the tuned NumPy baseline disagrees with the reference")
        t_cy = _median_seconds(run_cython, args.repeats)
        t_np = _median_seconds(run_numpy, max(5, args.repeats // 3))
        t_nt = _median_seconds(run_tuned, max(5, args.repeats // 3))
        results[name] = {
            "cython_median_us": round(t_cy * 1e6, 2),
            "numpy_median_us": round(t_np * 1e6, 2),
            "numpy_tuned_median_us": round(t_nt * 1e6, 2),
            "speedup_vs_numpy": round(t_np / t_cy, 2),
            "speedup_vs_numpy_tuned": round(t_nt / t_cy, 2),
            "cython_output_GBps_per_core": round(out_bytes / t_cy / 1e9, 3),
            "numpy_output_GBps_per_core": round(out_bytes / t_np / 1e9, 3),
        }
        print(f"{name:5s} cython {t_cy * 1e6:8.1f} us  {out_bytes / t_cy / 1e9:6.2f} GB/s   "
              f"numpy {t_np * 1e6:8.1f} us  x{t_np / t_cy:5.1f}   tuned numpy {t_nt * 1e6:7.1f} us  "
              f"x{t_nt / t_cy:5.1f}")

    record = {
        "benchmark": "tiler: tile -> RGB on white + background count -> NHWC batch slot, one thread",
        **_context(argv),
        "dtype": {"argb": "uint32 (h, w) premultiplied", "rgba": "uint8 (h, w, 4)", "rgb": "uint8 (h, w, 3)",
                  "output": "uint8 (h, w, 3)"},
        "shape": [n, n],
        "threshold": args.threshold,
        "repeats": args.repeats,
        "results": results,
        "targets": {"speedup_vs_numpy": 10.0, "output_GBps_per_core": 1.0},
    }
    return _write(record, args.out)


def _context(argv: list[str] | None, script: str = __file__) -> dict:
    """Machine, versions, time and the command line of `script` (the benchmark that records: pass its __file__)."""
    import sysconfig

    return {
        "command": " ".join(["python", os.path.relpath(script, ROOT)]
                            + (argv if argv is not None else sys.argv[1:])),
        "machine": {"cpu": cpu_name(), "logical_cpus": os.cpu_count(), "avx2": _has_avx2(),
                    "platform": platform.platform(),
                    "load_average_1min": round(os.getloadavg()[0], 2),
                    "note": "shared machine: other engineers' jobs may run on the same 2 cores"},
        "versions": {"python": platform.python_version(), "numpy": np.__version__,
                     "fastgicn": fastgicn.__version__,
                     "cython": _version("Cython"), "openslide_python": _version("openslide-python"),
                     "openslide_bin": _version("openslide-bin"), "cc": sysconfig.get_config_var("CC")},
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _write(record: dict, out: str) -> dict:
    text = json.dumps(record, indent=2)
    if out == "-":
        print(text)
    else:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n")
        print(f"wrote {out}")
    return record


def bench_read(args) -> dict:
    import tempfile
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import openslide

    from fastgicn.slide import open_slide

    spec = importlib.util.spec_from_file_location("_slide_fixtures", ROOT / "tests" / "slide_fixtures.py")
    fixtures = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fixtures)
    n, side = args.tile, 4096
    positions = [(x, y) for y in range(0, side, n) for x in range(0, side, n)]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.svs"
        fixtures.write_pyramid(path, fixtures.he_like(side, side), levels=3, svs=True, jpeg=True)

        def passes(fn, repeats=5):
            fn()
            return median_seconds(fn, repeats)

        ref = openslide.OpenSlide(path)

        def openslide_python():
            for x, y in positions:
                rgba = np.asarray(ref.read_region((x, y), 0, (n, n)))
                a = rgba[..., 3:].astype(np.float32) / 255.0
                np.rint(rgba[..., :3] * a + 255.0 * (1.0 - a)).astype(np.uint8)

        per_s = round(len(positions) / passes(openslide_python), 1)
        results = {"openslide_python_numpy_1_thread_tiles_per_s": per_s}
        ref.close()
        for handles in ("shared", "per_thread"):
            with open_slide(path, handles=handles) as slide:
                for threads in (1, 2):
                    # one pool per case, kept across passes: per_thread handles are opened once per thread
                    with ThreadPoolExecutor(threads) as pool:
                        def read_all(slide=slide, threads=threads, pool=pool):
                            cursor = iter(range(len(positions)))
                            lock = threading.Lock()

                            def work():
                                buf = np.empty((n, n, 3), np.uint8)
                                while True:
                                    with lock:
                                        i = next(cursor, None)
                                    if i is None:
                                        return
                                    slide.read_into(buf, positions[i][0], positions[i][1], 0, args.threshold)

                            for f in [pool.submit(work) for _ in range(threads)]:
                                f.result()

                        key = f"read_into_{handles}_{threads}_thread{'s' if threads > 1 else ''}_tiles_per_s"
                        results[key] = round(len(positions) / passes(read_all), 1)
    for k, v in results.items():
        print(f"{k:50s} {v:8.1f}")
    return {"benchmark": f"read {len(positions)} level-0 tiles of {n} x {n} from a {side} x {side} JPEG SVS "
                         "(256 x 256 JPEG tiles, quality 92), median of 5 passes",
            "results": results}


def _version(name: str) -> str | None:
    try:
        from importlib.metadata import version
        return version(name)
    except Exception:
        return None


if __name__ == "__main__":
    main()
