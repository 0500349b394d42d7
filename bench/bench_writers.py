"""Benchmark the pyramid TIFF writers of the segmentation maps: encoded 512 x 512 tiles per second.

Today's writer (the `fastgicn/slide/pyramid_tiff.py` of git HEAD, or of `--baseline REV`: one thread pulls,
encodes and writes every tile, deflate 6) against `PyramidBandWriter` (rows pushed in, tiles encoded by a
pool of 1 or 2 threads), on a probability map and its 0/255 mask, in one run; and the deflate level of the
probability map: MB/s per core and compressed size of levels 1..9 on its 512 x 512 tiles.

    python bench/bench_writers.py                                # smooth noisy map made with NumPy
    python bench/bench_writers.py --prob /tmp/demo_out/synthetic_demo.probability.tif   # a real output
    python bench/bench_writers.py --side 4096 --repeats 3 --out -

A writer's tiles/s is level-0 tiles over the wall time of writing the whole file (lower levels included,
as the pipeline pays for them); medians of `--repeats` runs. Writes bench/results/writers_cpu.json.
"""
from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path

import imagecodecs
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from bench_tiler import _context, _write  # noqa: E402

from fastgicn.outputs.tiff import MAP_DEFLATE_LEVEL, PyramidBandWriter  # noqa: E402
from machine import median_seconds  # bench/machine.py: run these scripts as python bench/NAME.py

TILE = 512


def probability_map(side: int, seed: int = 0) -> np.ndarray:
    """Smooth regions of high and low probability with pixel noise and a strip of glass (zeros)."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.random((side, side)).astype(np.float32), 24)
    field = (field - field.min()) / (np.ptp(field) + 1e-9)
    prob = 255 / (1 + np.exp(-12 * (field - 0.5))) + rng.normal(0, 6, (side, side))
    prob[:, : side // 8] = 0
    return np.clip(np.rint(prob), 0, 255).astype(np.uint8)


def load_baseline(rev: str):
    """`fastgicn.outputs.tiff` as it was at `rev`, imported under another name."""
    source = subprocess.run(["git", "show", f"{rev}:fastgicn/slide/pyramid_tiff.py"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    tmp = Path(tempfile.mkdtemp()) / "baseline_pyramid_tiff.py"
    tmp.write_text(source)
    spec = importlib.util.spec_from_file_location("fastgicn.slide._baseline_pyramid_tiff", tmp)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = "fastgicn.slide"
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module




def deflate_levels(img: np.ndarray, repeats: int) -> dict:
    tiles = [np.ascontiguousarray(img[y:y + TILE, x:x + TILE]) for y in range(0, img.shape[0], TILE)
             for x in range(0, img.shape[1], TILE)]
    tiles = [t for t in tiles if t.shape == (TILE, TILE) and t.min() != t.max()]  # the tiles that get encoded
    raw = sum(t.nbytes for t in tiles)
    out = {"tiles": len(tiles)}
    for level in (1, 2, 3, 4, 6, 9):
        size = sum(len(imagecodecs.deflate_encode(t, level=level)) for t in tiles)
        seconds = median_seconds(lambda level=level: [imagecodecs.deflate_encode(t, level=level) for t in tiles],
                                 repeats)
        out[f"level_{level}"] = {"MB_per_s_per_core": round(raw / seconds / 1e6, 1),
                                 "compressed_percent_of_raw": round(100 * size / raw, 2)}
        print(f"deflate {level}: {raw / seconds / 1e6:7.1f} MB/s per core, {100 * size / raw:6.2f}% of raw")
    return out


def writers(img: np.ndarray, mask: np.ndarray, baseline, repeats: int) -> dict:
    h, w = img.shape
    n_tiles = -(-h // TILE) * -(-w // TILE)
    results = {}
    with tempfile.TemporaryDirectory() as d:
        def old(src, mode):
            baseline.write_pyramid(Path(d) / "old.tif", w, h, lambda x, y, tw, th: src[y:y + th, x:x + tw],
                                   channels=1, tile=TILE, compression="deflate", downsample=mode)

        def new(src, mode, pool, level):
            wr = PyramidBandWriter(Path(d) / "new.tif", w, h, tile=TILE, downsample=mode, pool=pool,
                                   compression_level=level, queue_bands=2)
            for y in range(0, h, TILE):
                wr.write_rows(y, src[y:y + TILE])
            wr.close()

        def both(pool, level):  # the pipeline's case: the two maps at once, one shared pool
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(pool, thread_name_prefix="bench-encode") as ex:
                a = PyramidBandWriter(Path(d) / "a.tif", w, h, tile=TILE, downsample="mean", pool=ex,
                                      compression_level=level, queue_bands=2)
                b = PyramidBandWriter(Path(d) / "b.tif", w, h, tile=TILE, downsample="majority", pool=ex,
                                      compression_level=level, queue_bands=2)
                for y in range(0, h, TILE):
                    a.write_rows(y, img[y:y + TILE])
                    b.write_rows(y, mask[y:y + TILE])
                a.close()
                b.close()

        for name, src, mode in (("probability", img, "mean"), ("mask", mask, "majority")):
            row = {"today_1_thread_deflate6": n_tiles / median_seconds(lambda: old(src, mode), repeats)}
            for level in sorted({6, MAP_DEFLATE_LEVEL}):
                for pool in (1, 2):
                    row[f"pool_{pool}_deflate{level}"] = n_tiles / median_seconds(
                        lambda pool=pool, level=level: new(src, mode, pool, level), repeats)
            results[name] = {k: round(v, 1) for k, v in row.items()}
            print(name, results[name])
        row = {}
        for level in sorted({6, MAP_DEFLATE_LEVEL}):
            for pool in (1, 2):
                row[f"pool_{pool}_deflate{level}"] = round(
                    n_tiles / median_seconds(lambda pool=pool, level=level: both(pool, level), repeats), 1)
        results["probability_and_mask_at_once_shared_pool"] = row
        print("both", row)
    return results


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prob", help="a probability TIFF (level 0 is read; a central square of --side is used)")
    p.add_argument("--side", type=int, default=6144, help="side of the square map, px (default 6144)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--baseline", default="HEAD", help="git revision of today's writer (default HEAD)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "writers_cpu.json"))
    args = p.parse_args(argv)
    if args.prob:
        import tifffile

        full = tifffile.imread(args.prob, key=0)
        cy, cx, r = full.shape[0] // 2, full.shape[1] // 2, args.side // 2
        img = np.ascontiguousarray(full[max(0, cy - r):cy + r, max(0, cx - r):cx + r])
        source = f"{args.prob} level 0, central {img.shape[1]} x {img.shape[0]}"
    else:
        img = probability_map(args.side)
        source = f"probability_map({args.side}): gaussian-smoothed field through a logistic, noise sd 6, 1/8 glass"
    mask = np.where(img >= 128, 255, 0).astype(np.uint8)
    uniform = [t.min() == t.max() for t in (img[y:y + TILE, x:x + TILE] for y in range(0, img.shape[0], TILE)
                                            for x in range(0, img.shape[1], TILE))]
    print(source, f"{sum(uniform)} of {len(uniform)} tiles uniform")
    baseline = load_baseline(args.baseline)
    record = {
        "benchmark": "pyramid TIFF writers: level-0 tiles of 512 x 512 per second, whole file (lower levels "
                     "included), median of repeats; deflate levels on the map's non-uniform tiles, one core",
        **_context(argv, __file__),
        "source": source, "shape": list(img.shape), "tiles": len(uniform), "uniform_tiles": int(sum(uniform)),
        "baseline": f"fastgicn/slide/pyramid_tiff.py at {args.baseline}: one thread, deflate 6",
        "map_deflate_level": MAP_DEFLATE_LEVEL,
        "repeats": args.repeats,
        "deflate_levels_probability": deflate_levels(img, args.repeats),
        "writers_tiles_per_s": writers(img, mask, baseline, args.repeats),
    }
    return _write(record, args.out)


if __name__ == "__main__":
    main()
