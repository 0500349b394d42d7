"""Benchmark the stitcher: milliseconds per 512 x 512 tile on a 16 x 16 grid, per mode and overlap.

One thread, tiles fed in grid order as the device runner hands them back (batches of `--batch` for
`add_batch`, one at a time for `add`), every finished row handed to a sink that keeps nothing (so the time
is the stitcher's: placing, blending, rounding and the band's upkeep). Cases: crop (overlap 0 and 64), blend at
overlap 0, 32 and 64. The outputs of every feeding are checked equal before anything is timed.

    python bench/bench_stitch.py                       # writes bench/results/stitch_cpu.json
    python bench/bench_stitch.py --before 1c9f2a5      # also times the stitcher of a git revision, same run
    python bench/bench_stitch.py --grid 8 --repeats 3 --out -

`--before REV` loads `fastgicn/slide/stitch.py` as it was at git revision REV (the per-tile float32 stitcher
before `add_batch`) and times its `add` on the same tiles, so before / after ratios come from one run.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np

import fastgicn
from fastgicn.tiling import stitch as current
from machine import cpu_name  # bench/machine.py: run these scripts as python bench/NAME.py

ROOT = Path(__file__).resolve().parents[1]
CASES = [("crop", 0), ("crop", 64), ("blend", 0), ("blend", 32), ("blend", 64)]


def _load_revision(rev: str) -> types.ModuleType:
    source = subprocess.run(["git", "show", f"{rev}:fastgicn/slide/stitch.py"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    source = source.replace("from ..errors import", "from fastgicn.errors import").replace(
        "from .. import _tiler", "from fastgicn import _tiler")
    module = types.ModuleType(f"stitch_{rev}")
    exec(compile(source, f"{rev}:fastgicn/slide/stitch.py", "exec"), module.__dict__)
    return module


def _grid(n: int, tile: int, overlap: int) -> tuple[np.ndarray, int]:
    stride = tile - overlap
    side = tile + (n - 1) * stride
    ys, xs = np.meshgrid(np.arange(n) * stride, np.arange(n) * stride, indexing="ij")
    return np.stack([xs.ravel(), ys.ravel()], axis=1).astype(np.int64), side


def _feed(module, how: str, grid, side, tile, mode, probs, batch, keep=False):
    out = np.zeros((side, side), np.uint8) if keep else None

    def sink(y0, rows):
        if keep:
            out[y0:y0 + len(rows)] = rows

    st = module.Stitcher(grid, side, side, tile, sink, mode=mode)
    n = len(grid)
    if how == "add_batch":
        for s in range(0, n, batch):
            idx = np.arange(s, min(n, s + batch))
            st.add_batch(idx, probs[idx % len(probs)])
    else:
        for i in range(n):
            st.add(i, probs[i % len(probs)])
    st.close()
    return out


def _median_ms_per_tile(fn, n_tiles: int, repeats: int) -> float:
    fn()  # warm: weight tiles, page faults
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) / n_tiles * 1e3)
    return statistics.median(samples)




def _version(dist: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:
        return None


def _context(argv: list[str] | None) -> dict:
    import sysconfig

    return {
        "command": " ".join(["python", os.path.relpath(__file__, ROOT)]
                            + (argv if argv is not None else sys.argv[1:])),
        "machine": {"cpu": cpu_name(), "logical_cpus": os.cpu_count(), "platform": platform.platform(),
                    "load_average_1min": round(os.getloadavg()[0], 2),
                    "note": "shared machine: other engineers' jobs may run on the same 2 cores"},
        "versions": {"python": platform.python_version(), "numpy": np.__version__,
                     "fastgicn": fastgicn.__version__, "cython": _version("Cython"),
                     "cc": sysconfig.get_config_var("CC")},
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument("--grid", type=int, default=16, help="tiles per side of the square grid (default 16)")
    parser.add_argument("--batch", type=int, default=16, help="tiles per add_batch call (default 16)")
    parser.add_argument("--repeats", type=int, default=7, help="timed passes over the grid per case (median)")
    parser.add_argument("--before", default=None, metavar="REV",
                        help="also time fastgicn/slide/stitch.py as it was at this git revision")
    parser.add_argument("--out", default=None,
                        help="JSON path, or - for stdout only (default bench/results/stitch_cpu.json)")
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = str(ROOT / "bench" / "results" / "stitch_cpu.json")
    rng = np.random.default_rng(0)
    probs = rng.integers(0, 256, (32, args.tile, args.tile), dtype=np.uint8)  # 32 distinct tiles, cycled
    impls = {"add_batch": (current, "add_batch"), "add": (current, "add")}
    if args.before:
        impls[f"before ({args.before}) add"] = (_load_revision(args.before), "add")
    results = []
    for mode, overlap in CASES:
        grid, side = _grid(args.grid, args.tile, overlap)
        row = {"mode": mode, "overlap": overlap, "image": [side, side], "tiles": len(grid), "ms_per_tile": {}}
        ref = None
        for name, (module, how) in impls.items():
            out = _feed(module, how, grid, side, args.tile, mode, probs, args.batch, keep=True)
            if ref is None:
                ref = out
            else:
                diff = np.abs(out.astype(int) - ref)
                row.setdefault("max_abs_difference_to_add_batch", {})[name] = int(diff.max())
                if not name.startswith("before") and diff.any():
                    raise AssertionError(f"{mode} {overlap}: {name} differs from add_batch")
            del out
            row["ms_per_tile"][name] = round(_median_ms_per_tile(
                lambda: _feed(module, how, grid, side, args.tile, mode, probs, args.batch), len(grid),
                args.repeats), 4)
        if args.before:
            before = row["ms_per_tile"][f"before ({args.before}) add"]
            row["speedup_add_batch_vs_before"] = round(before / row["ms_per_tile"]["add_batch"], 2)
        print(f"{mode:5s} overlap {overlap:3d}: " + ", ".join(f"{k} {v:.3f} ms" for k, v in
                                                               row["ms_per_tile"].items()), flush=True)
        results.append(row)
    record = {"benchmark": f"stitcher: ms per {args.tile}^2 uint8 tile on a {args.grid} x {args.grid} grid, one "
                           "thread, grid order, sink keeps nothing",
              **_context(argv, __file__), "tile": args.tile, "grid": args.grid, "batch": args.batch,
              "repeats": args.repeats, "statistic": "median over repeats of (pass seconds / tiles)",
              "results": results,
              "note": "blend sums are exact 8.8 fixed point now; the float32 stitcher of --before rounded each "
                      "weighted tile, so blend at overlap > 0 may differ from it by 1 (max_abs_difference)"}
    text = json.dumps(record, indent=2)
    if args.out == "-":
        print(text)
    else:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
        print(f"wrote {args.out}")
    return record


if __name__ == "__main__":
    main()
