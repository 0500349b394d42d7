"""Benchmark the whole-slide pipeline: seconds per stage, tiles/s, peak RSS, reader throughput.

Three parts, each measurement in its own child process (peak RSS is per process):

1. ``real``: synthetic slides (default 20,000^2 and 40,000^2, about 35 % tissue) written as SVS files
   (`write_synthetic_slide`) and segmented through OpenSlide with `segment_slide`, Dice against their
   ground-truth masks; the report's seconds per stage, tiles/s and peak RSS (4x the area, same RSS).
2. ``read``: the batch ring alone on that file (no model), 512-pixel tiles at level 0: tiles/s for 1, 2 and 4
   reader threads with one shared OpenSlide handle or one handle per thread (best of --repeats).
3. ``sparse``: canvases of growing area (default 20,000^2, 20,000 x 100,000, 40,000^2 and 100,000^2 level-0
   pixels) of glass
   holding the same few synthetic tissue cores (a tissue-microarray-like layout), served by an in-memory
   virtual slide. The tissue, hence the network's work, is the same for every size while the outputs (two
   pyramidal TIFFs of the whole canvas), the stitching band and the summaries grow with the canvas: peak RSS
   must not grow with the area (it grows with the width: bands are as wide as the image). A dense 100,000^2
   synthetic file takes ~7 minutes to write and its ~20,000 tissue tiles ~10 minutes more on 2 cores, past
   this benchmark's budget; the sparse canvases are what fits on a small CPU machine.

    python bench/bench_pipeline.py                       # all three, ~10-15 minutes on 2 CPU cores
    python bench/bench_pipeline.py --parts sparse --sparse-sizes 20000 100000
    python bench/bench_pipeline.py --parts host      # issue 9: host ceiling -> bench/results/pipeline_host_cpu.json

4. ``host`` (issue 9, its own JSON: bench/results/pipeline_host_cpu.json or --host-json; not in the default
   parts): the host ceiling. A zero-cost model (`fastgicn.bench.ZeroCostModel`: constant logits, mean/std
   buffers) runs the whole flow (`segment_slide`, every output) on synthetic slides at 0.5 um/px, an Aperio
   1/4/16 one (level 0 box-reduced 2x) and a power-of-two one, against the raw decode (`read_into` from the
   same number of threads, no model) of the same candidate tiles, interleaved rounds in one process: tiles/s,
   their ratio (target >= 0.5), the report's seconds per stage; then the demo model end to end against
   model-only (normalise + forward on the same batches) on the first slide. `--quick` runs it in seconds.

Model: the demo weights when installed (their tile config: 256-pixel tiles, overlap 32, 0.5 um/px), else a
randomly initialised resnet50_gicn_gpp(width=0.125) with the same tile config. Results: bench/results/
pipeline_cpu.json (or --json), with the machine, versions and the command.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rss import RssSampler, status_kib  # bench/rss.py: run these scripts as python bench/NAME.py
from machine import cpu_name  # bench/machine.py: run these scripts as python bench/NAME.py

ROOT = Path(__file__).resolve().parent.parent


def _model(weights: str | None):
    import torch

    from fastgicn.config import TileConfig
    from fastgicn.models import create_model
    from fastgicn.demo import DEMO_WEIGHTS
    from fastgicn.train import load_checkpoint, model_from_checkpoint

    path = Path(weights) if weights else DEMO_WEIGHTS
    if path.is_file():
        payload = load_checkpoint(path)
        return model_from_checkpoint(payload), TileConfig.from_dict(payload["tile_config"]), str(path)
    torch.manual_seed(0)
    model = create_model("resnet50_gicn_gpp", width=0.125).eval()
    return model, TileConfig(tile_size=256, overlap=32, target_mpp=0.5, batch_size=8), "random init (no demo weights)"


# ---------------------------------------------------------------------------------------------------
# a virtual tissue-sparse slide

def sparse_slide_class():
    import numpy as np

    from fastgicn import _tiler
    from fastgicn.slide import Slide

    glass = np.array([243, 243, 246], np.uint8)

    class SparseSlide(Slide):
        """`width` x `height` of glass (RGB 243, 243, 246) with copies of one tissue patch at `positions`
        (level-0 corners, multiples of 2^levels). Levels halve down to 1/2^(levels-1); each level holds
        the patch once, block-averaged, so memory is the patch pyramid whatever the canvas size."""

        def __init__(self, width, height, patch, positions, mpp=0.25, levels=7):
            super().__init__()
            self.path, self.name, self.vendor = None, f"sparse {width}x{height}", "virtual"
            self.level_downsamples = tuple(float(2 ** k) for k in range(levels))
            self.level_dimensions = tuple((-(-width // 2 ** k), -(-height // 2 ** k)) for k in range(levels))
            self.mpp_xy, self.objective_power, self.properties = (mpp, mpp), None, {}
            self.positions = [(int(x), int(y)) for x, y in positions]
            self.patches = [patch]
            for _ in range(1, levels):
                p = self.patches[-1]
                h2, w2 = p.shape[0] // 2 * 2, p.shape[1] // 2 * 2
                q = p[:h2, :w2].reshape(h2 // 2, 2, w2 // 2, 2, 3).astype(np.uint16).sum((1, 3))
                self.patches.append(((q + 2) // 4).astype(np.uint8))

        def _read(self, out, l0_x, l0_y, level, threshold):
            ds = 2 ** level
            h, w = out.shape[:2]
            x0, y0 = l0_x // ds, l0_y // ds
            W, H = self.level_dimensions[level]
            out[...] = 255
            cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x0 + w, W), min(y0 + h, H)
            if cx1 > cx0 and cy1 > cy0:
                out[cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0] = glass
            p = self.patches[level]
            for px, py in self.positions:
                px, py = px // ds, py // ds
                ax0, ay0 = max(px, x0, 0), max(py, y0, 0)
                ax1, ay1 = min(px + p.shape[1], x0 + w, W), min(py + p.shape[0], y0 + h, H)
                if ax1 > ax0 and ay1 > ay0:
                    out[ay0 - y0:ay1 - y0, ax0 - x0:ax1 - x0] = p[ay0 - py:ay1 - py, ax0 - px:ax1 - px]
            return int(round(_tiler.white_fraction(out, threshold) * h * w))

    return SparseSlide


# ---------------------------------------------------------------------------------------------------
# children

def child_real(args) -> dict:
    from fastgicn.outputs.report import peak_rss_mb
    from fastgicn.pipeline import segment_slide

    model, config, weights = _model(args.weights)
    rss0 = status_kib("VmRSS")
    sampler = RssSampler()
    sampler.start()
    with tempfile.TemporaryDirectory(dir=args.tmp) as out:
        res = segment_slide(args.slide, out, model, config, truth=args.truth, threads=args.threads,
                            handles=args.handles, progress=False, weights=weights)
    sampler.stop()
    rep = res.report
    return {"slide": args.slide, "weights": weights, "config": config.to_dict(), "tiles": rep["tiles"],
            "seconds": rep["seconds"], "tiles_per_second": rep["tiles_per_second"], "dice": rep["dice"],
            "tumour_area_mm2": rep["tumour"]["area_mm2"], "tissue_area_mm2": rep["tissue"]["area_mm2"],
            "rss_mb": {"before_segment": rss0 / 1024, "peak_sampled": sampler.peak_kib / 1024,
                       "ru_maxrss": peak_rss_mb()}}


def child_read(args) -> dict:
    from fastgicn.config import TileConfig
    from fastgicn.slide import open_slide
    from fastgicn.tiling import tissue_tiles
    from fastgicn.tiling.batches import BatchRing
    from fastgicn.tiling.grid import read_level_for

    # level 0 and the paper's 512-pixel tiles: the most pixels per tile OpenSlide decodes
    config = TileConfig(tile_size=args.read_tile, level=0, batch_size=8)
    rows = []
    for handles in ("shared", "per_thread"):
        for threads in (1, 2, 4):
            slide = open_slide(args.slide, handles=handles)
            try:
                level = read_level_for(slide, config)
                tiles = tissue_tiles(slide, config, read=False)
                best = None
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    n = 0
                    with BatchRing(slide, tiles, level=level, tile_size=config.tile_size,
                                   batch_size=config.batch_size, threads=threads) as ring:
                        for b in ring:
                            n += len(b) + len(b.rejected)
                    dt = time.perf_counter() - t0
                    best = dt if best is None else min(best, dt)
                rows.append({"handles": handles, "threads": threads, "tiles": n, "seconds": best,
                             "tiles_per_second": n / best,
                             "megapixels_per_second": n * config.tile_size ** 2 / best / 1e6})
            finally:
                slide.close()
    return {"slide": args.slide, "tile_size": config.tile_size, "repeats": args.repeats, "rows": rows}


def child_sparse(args) -> dict:
    from fastgicn.outputs.report import peak_rss_mb
    from fastgicn.pipeline import segment_slide
    from fastgicn.synth import SyntheticSlide

    model, config, weights = _model(args.weights)
    core = args.core
    patch, _ = SyntheticSlide(core, core, seed=7).render(0, 0, core, core)
    width, height = args.size
    step = 64 * 2 ** 6
    # cores spread over the canvas (same count for every size): a 2 x 2 layout around the centre
    positions = [((width // 4 + i * width // 2 - core // 2) // step * step,
                  (height // 4 + j * height // 2 - core // 2) // step * step) for j in range(2) for i in range(2)]
    SparseSlide = sparse_slide_class()
    slide = SparseSlide(width, height, patch, positions)
    rss0 = status_kib("VmRSS")
    sampler = RssSampler()
    sampler.start()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=args.tmp) as out:
        res = segment_slide(slide, out, model, config,
                            name=f"sparse{width}x{height}", threads=args.threads, progress=False,
                            weights=weights)
        sizes = {k: Path(p).stat().st_size for k, p in res.outputs.items()}
    wall = time.perf_counter() - t0
    sampler.stop()
    rep = res.report
    return {"canvas": [width, height], "cores": len(positions), "core_side": core, "weights": weights,
            "config": config.to_dict(), "read_level_dimensions": rep["read"]["dimensions"],
            "tiles": rep["tiles"], "seconds": rep["seconds"], "wall_seconds": wall,
            "tiles_per_second": rep["tiles_per_second"], "output_bytes": sizes,
            "stitch_band_rows_peak": rep["memory"]["stitch_band_rows_peak"],
            "summary_downsample": rep["memory"]["summary_downsample"],
            "rss_mb": {"before_segment": rss0 / 1024, "peak_sampled": sampler.peak_kib / 1024,
                       "ru_maxrss": peak_rss_mb(), "samples": sampler.samples}}


def child_host(args) -> dict:
    """Issue 9's host ceiling: the whole flow with a zero-cost model against raw decode of the same tiles (per
    layout), then the real demo model end to end against model-only (fastgicn.bench's functions)."""
    import torch

    from fastgicn import bench
    from fastgicn.config import TileConfig

    out = {"load_average_start": bench._load_average(), "torch_threads": torch.get_num_threads()}
    config = TileConfig(tile_size=args.host_tile, target_mpp=0.5, batch_size=args.host_batch)
    out["zero_cost"] = {}
    work = Path(tempfile.mkdtemp(dir=args.tmp, prefix="fastgicn-host-"))
    try:
        for layout in args.layouts:
            t0 = time.perf_counter()
            slide = bench.write_bench_slide(work / f"host_{layout}.svs", args.host_side, layout)
            written = time.perf_counter() - t0
            r = bench.host_ceiling(slide, config, threads=args.threads, repeats=args.repeats, work_dir=work)
            out["zero_cost"][layout] = {"slide_side": args.host_side, "write_seconds": written,
                                        "bytes": slide.stat().st_size, **r}
            if layout == args.layouts[0] and not args.no_real_model:
                out["real_model"] = real_model_ratio(args, slide, work)
            slide.unlink()
    finally:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    out["load_average_end"] = bench._load_average()
    return out


def real_model_ratio(args, slide, work) -> dict:
    from fastgicn import bench
    from fastgicn.config import TileConfig

    try:
        from fastgicn.checkpoint import load_model

        loaded = load_model(args.weights)
    except Exception as exc:  # no demo weights installed
        return {"available": False, "reason": f"{type(exc).__name__}: {exc}"}
    model, payload, path = loaded if isinstance(loaded, tuple) else (loaded, {}, args.weights)
    config = TileConfig.from_dict(payload["tile_config"]) if payload.get("tile_config") else \
        TileConfig(tile_size=256, overlap=32, target_mpp=0.5, batch_size=8)
    return {"available": True, **bench.model_only_ratio(slide, model, config, threads=args.threads,
                                                        repeats=args.repeats, work_dir=work, weights=path,
                                                        device=args.device)}


def parse_size(text: str) -> tuple[int, int]:
    w, _, h = text.lower().partition("x")
    return int(w), int(h or w)


def run_child(argv: list[str], timeout: float) -> dict:
    cmd = [sys.executable, __file__, "--child"] + argv
    print("  $", " ".join(cmd[1:]), flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, check=False)
    if proc.returncode != 0:
        return {"error": proc.stderr[-3000:], "returncode": proc.returncode}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def machine() -> dict:
    import numpy as np
    import torch

    cpu = cpu_name()
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
            "openslide": __import__("openslide").__library_version__,
            "load_average_at_start": os.getloadavg()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--child", choices=["real", "read", "sparse", "host"], default=None, help=argparse.SUPPRESS)
    p.add_argument("--parts", nargs="+", choices=["real", "read", "sparse", "host"],
                   default=["real", "read", "sparse"],
                   help="host: issue 9's host ceiling (its own JSON, --host-json); run it alone: --parts host")
    p.add_argument("--host-side", type=int, default=12288,
                   help="host ceiling: level-0 side of each synthetic slide (0.25 um/px)")
    p.add_argument("--host-tile", type=int, default=512, help="host ceiling: tile side at 0.5 um/px")
    p.add_argument("--host-batch", type=int, default=8, help="host ceiling: batch size")
    p.add_argument("--layouts", nargs="+", choices=["aperio", "pow2"], default=["aperio", "pow2"],
                   help="host ceiling: slide layouts (aperio: level 0 reduced 2x; pow2: a stored 2x level)")
    p.add_argument("--device", default="cpu", help="host ceiling: device of the demo model's ratio (cpu, cuda)")
    p.add_argument("--no-real-model", action="store_true", help="host ceiling: skip the demo model's ratio")
    p.add_argument("--quick", action="store_true",
                   help="host ceiling in seconds (2048-pixel slides, 256 tiles, 1 round): a smoke test")
    p.add_argument("--host-json", type=Path, default=ROOT / "bench" / "results" / "pipeline_host_cpu.json")
    p.add_argument("--real-sizes", type=int, nargs="+", default=[20000, 40000],
                   help="sides of the dense synthetic SVS files (level-0 pixels); the reader bench uses the first")
    p.add_argument("--sparse-sizes", type=parse_size, nargs="+",
                   default=[(20000, 20000), (20000, 100000), (40000, 40000), (100000, 100000)],
                   help="WIDTHxHEIGHT (or N for N x N) of the sparse canvases")
    p.add_argument("--core", type=int, default=2048, help="side of each tissue core in the sparse canvases")
    p.add_argument("--weights", default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--handles", default="shared")
    p.add_argument("--torch-threads", type=int, default=None,
                   help="torch CPU threads (default: torch's, or 1 when the load average exceeds the cores)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--read-tile", type=int, default=512, help="tile side for the reader benchmark (level 0)")
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--tmp", default=None, help="directory for slides and outputs (default: the system's)")
    p.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "pipeline_cpu.json")
    # child-only
    p.add_argument("--slide", default=None, help=argparse.SUPPRESS)
    p.add_argument("--truth", default=None, help=argparse.SUPPRESS)
    p.add_argument("--size", type=parse_size, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.child:
        if args.torch_threads:
            import torch

            torch.set_num_threads(args.torch_threads)
        result = {"real": child_real, "read": child_read, "sparse": child_sparse,
                  "host": child_host}[args.child](args)
        print(json.dumps(result))
        return

    if args.quick:
        args.host_side, args.host_tile, args.repeats = min(args.host_side, 2048), min(args.host_tile, 256), 1
    if args.torch_threads is None and os.getloadavg()[0] > (os.cpu_count() or 1):
        args.torch_threads = 1  # torch's OpenMP threads stall when other processes keep the cores busy
    started = time.time()
    if "host" in args.parts:
        host_main(args, started)
        args.parts = [p for p in args.parts if p != "host"]
        if not args.parts:
            return
        started = time.time()
    record = {"what": "whole-slide pipeline on CPU: seconds per stage, tiles/s, peak RSS, reader throughput",
              "command": "python " + " ".join([os.path.relpath(__file__, ROOT)] + sys.argv[1:]),
              "machine": machine(), "parts": {}}
    if args.torch_threads is None and os.getloadavg()[0] > (os.cpu_count() or 1):
        args.torch_threads = 1  # torch's OpenMP threads stall when other processes keep the cores busy
    record["torch_threads"] = args.torch_threads or "torch default"
    common = ["--threads", str(args.threads)] + (["--torch-threads", str(args.torch_threads)]
                                                 if args.torch_threads else [])
    common += (["--weights", args.weights] if args.weights else []) + \
        (["--tmp", args.tmp] if args.tmp else [])
    with tempfile.TemporaryDirectory(dir=args.tmp) as work:
        if "real" in args.parts or "read" in args.parts:
            from fastgicn.synth import write_synthetic_slide

            record["parts"]["real"], record["synthetic_slides"] = [], []
            sizes = args.real_sizes if "real" in args.parts else args.real_sizes[:1]
            for k, size in enumerate(sizes):
                t0 = time.perf_counter()
                slide, mask = write_synthetic_slide(Path(work) / f"synthetic_{size}.svs", size, size, seed=11)
                info = {"size": [size, size], "seed": 11, "write_seconds": time.perf_counter() - t0,
                        "bytes": slide.stat().st_size}
                record["synthetic_slides"].append(info)
                print(f"wrote {slide} in {info['write_seconds']:.1f} s", flush=True)
                if "real" in args.parts:
                    r = run_child(["real", "--slide", str(slide), "--truth", str(mask), "--handles", args.handles]
                                  + common, args.timeout)
                    record["parts"]["real"].append(r)
                    if "rss_mb" in r:
                        print(f"  real {size}^2: {r['tiles']['segmented']} tiles, {r['seconds']['total']:.0f} s, "
                              f"{r['tiles_per_second']:.1f} tiles/s, Dice {r['dice']['dice']:.4f}, peak RSS "
                              f"{r['rss_mb']['peak_sampled']:.0f} MB", flush=True)
                    else:
                        print(f"  real {size}^2 failed: {r.get('error', '')[-500:]}", flush=True)
                if "read" in args.parts and k == 0:
                    record["parts"]["read"] = run_child(["read", "--slide", str(slide), "--repeats",
                                                         str(args.repeats), "--read-tile", str(args.read_tile)]
                                                        + common, args.timeout)
                    for row in record["parts"]["read"].get("rows", []):
                        print(f"  read {row['handles']:>10} x{row['threads']}: {row['tiles_per_second']:.0f} "
                              "tiles/s", flush=True)
                slide.unlink()
                mask.unlink()
        if "sparse" in args.parts:
            rows = []
            for w, h in args.sparse_sizes:
                r = run_child(["sparse", "--size", f"{w}x{h}", "--core", str(args.core)] + common, args.timeout)
                rows.append(r)
                size = f"{w}x{h}"
                if "rss_mb" in r:
                    print(f"  sparse {size}: {r['tiles']['segmented']} tiles, {r['wall_seconds']:.0f} s, peak RSS "
                          f"{r['rss_mb']['peak_sampled']:.0f} MB (before segmenting {r['rss_mb']['before_segment']:.0f}"
                          f" MB), band {r['stitch_band_rows_peak']} rows", flush=True)
                else:
                    print(f"  sparse {size} failed: {r.get('error', '')[-500:]}", flush=True)
            record["parts"]["sparse"] = rows
            ok = [r for r in rows if "rss_mb" in r]
            record["parts"]["sparse_summary"] = {
                "rows": [{"canvas": r["canvas"], "megapixels": r["canvas"][0] * r["canvas"][1] / 1e6,
                          "peak_rss_mb": round(r["rss_mb"]["peak_sampled"], 1),
                          "rss_before_segmenting_mb": round(r["rss_mb"]["before_segment"], 1)} for r in ok],
                "note": "peak RSS includes the model, torch and the tissue cores the virtual slide holds; the stitch "
                        "band (2 tiles x width, 2 bytes a pixel blended) and the TIFF writers' bands grow with "
                        "the canvas width, nothing with its height: compare equal widths"}
    record["total_seconds"] = time.time() - started
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(record, indent=2, default=str) + "\n")
    print(f"wrote {args.json} ({record['total_seconds']:.0f} s)")


def host_main(args, started: float) -> None:
    argv = ["host", "--threads", str(args.threads), "--repeats", str(args.repeats), "--host-side",
            str(args.host_side), "--host-tile", str(args.host_tile), "--host-batch", str(args.host_batch),
            "--layouts", *args.layouts, "--device", args.device] + (["--no-real-model"] if args.no_real_model else []) + \
        (["--torch-threads", str(args.torch_threads)] if args.torch_threads else []) + \
        (["--weights", args.weights] if args.weights else []) + (["--tmp", args.tmp] if args.tmp else [])
    record = {"what": "host ceiling (issue 9): the whole flow with a zero-cost model vs raw decode of the same tiles "
                      "at the same reader threads, seconds per stage, and the demo model's end-to-end / model-only",
              "command": "python " + " ".join([os.path.relpath(__file__, ROOT)] + sys.argv[1:]),
              "machine": machine(), "goal": {"host_ceiling_ratio": 0.5}}
    record["host"] = run_child(argv, args.timeout)
    record["total_seconds"] = time.time() - started
    args.host_json.parent.mkdir(parents=True, exist_ok=True)
    args.host_json.write_text(json.dumps(record, indent=2, default=str) + "\n")
    h = record["host"]
    if "error" in h:
        print(f"  host ceiling failed: {h['error'][-800:]}", flush=True)
    for layout, r in h.get("zero_cost", {}).items():
        print(f"  host ceiling {layout}: flow {r['flow_tiles_per_s']:.1f} tiles/s vs decode "
              f"{r['decode_tiles_per_s']:.1f} tiles/s = {r['ratio']:.3f} (loop alone {r['ratio_loop']:.3f}); "
              f"{r['candidate_tiles']} tiles, {args.threads} threads", flush=True)
    m = h.get("real_model")
    if m and m.get("available"):
        print(f"  demo model: end to end {m['end_to_end_tiles_per_s']:.1f} tiles/s vs model-only "
              f"{m['model_only_tiles_per_s']:.1f} = {m['ratio']:.3f}", flush=True)
    print(f"wrote {args.host_json} ({record['total_seconds']:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
