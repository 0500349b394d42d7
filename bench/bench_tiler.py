"""Benchmark the Cython tiler loops against the NumPy references of tests/test_tiler.py.

One thread, one tile at a time, as a reader thread does it: convert a tile to RGB on white, count the
background pixels and write it into a slot of an NHWC batch. Reports the median time per tile, output
GB/s per core and the speed-up over the NumPy reference (the test oracle) and over a NumPy version
tuned for speed (integer, in place); checks the outputs agree before timing anything.

    python bench/bench_tiler.py                      # 512 x 512 tiles, writes bench/results/tiler_cpu.json
    python bench/bench_tiler.py --tile 256 --repeats 50 --out -
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


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _has_avx2() -> bool:
    try:
        return " avx2" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tile", type=int, default=512, help="tile side in pixels (default 512, the paper's)")
    parser.add_argument("--repeats", type=int, default=31, help="timed samples per case (median reported)")
    parser.add_argument("--threshold", type=int, default=220)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "tiler_cpu.json"),
                        help="JSON path, or - for stdout only")
    args = parser.parse_args(argv)

    refs = _load_references()
    rng = np.random.default_rng(0)
    n = args.tile
    # realistic content: mostly opaque tissue-like colours, a band of glass and a transparent corner
    argb = refs.random_argb(rng, n, n, alpha="opaque")
    argb[: n // 4] = refs.pack_argb(np.full((n // 4, n, 3), 235, np.uint8), np.full((n // 4, n), 255, np.uint8))
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
        "command": "python " + " ".join([os.path.relpath(__file__, ROOT)] + (argv if argv is not None else sys.argv[1:])),
        "machine": {"cpu": _cpu_name(), "logical_cpus": os.cpu_count(), "avx2": _has_avx2(),
                    "platform": platform.platform(), "note": "shared machine: other jobs may run on its cores"},
        "versions": {"python": platform.python_version(), "numpy": np.__version__, "fastgicn": fastgicn.__version__,
                     "cython": _version("Cython"), "compiler": platform.python_compiler()},
        "dtype": {"argb": "uint32 (h, w) premultiplied", "rgba": "uint8 (h, w, 4)", "rgb": "uint8 (h, w, 3)",
                  "output": "uint8 (h, w, 3)"},
        "shape": [n, n],
        "threshold": args.threshold,
        "repeats": args.repeats,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "results": results,
        "targets": {"speedup_vs_numpy": 10.0, "output_GBps_per_core": 1.0},
    }
    text = json.dumps(record, indent=2)
    if args.out == "-":
        print(text)
    else:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
        print(f"wrote {args.out}")
    return record


def _version(name: str) -> str | None:
    try:
        from importlib.metadata import version
        return version(name)
    except Exception:
        return None


if __name__ == "__main__":
    main()
