"""Slide reading speed: OpenSlide `read_region` against the direct tiled-TIFF reader, in one run (issue 8).

512 x 512 tiles/s at 1 and 2 reader threads on three slides written here:

- ``jpeg_svs``: a synthetic JPEG SVS in the layout Aperio scanners write (`write_synthetic_slide`,
  layout "aperio": levels 1/4/16, 256-pixel tiles, 0.25 um/px);
- ``j2k_svs``: an Aperio JPEG 2000 SVS (compression 33003, YCbCr components; tests/tiff_layouts.py);
- ``deflate_tiff``: a generic tiled TIFF, deflate level 6 (tests/tiff_layouts.py).

Readers, on the same tile positions (the 512-pixel grid at level 0, row-major: every tile read once per
measurement, so OpenSlide's 32 MB tile cache, smaller than each slide's decoded level 0, gives no hits):

- ``direct``: `open_slide(path, reader="direct").read_into(...)` (tiles by offset, imagecodecs decode);
- ``openslide``: `open_slide(path, reader="openslide").read_into(...)` (libopenslide through fastgicn's
  ctypes path, ARGB -> RGB in Cython);
- ``openslide-python``: openslide-python's own `OpenSlide.read_region` (a PIL RGBA image; for reference).

Every (slide, reader, threads) measurement is repeated `--repeats` times, interleaved (the reader order rotates
each round), and the medians are reported; the ratios direct / OpenSlide are the medians of the per-round
ratios (each pair measured back to back), so slow phases of a shared machine cancel out. Scaling is the
2-thread / 1-thread rate of the same reader. The load average is recorded before, during (per round) and
after: on a machine shared with other jobs the 2-thread scaling shows the load, not the reader.

Also the resampled path: 0.5 um/px from the 0.25 um/px JPEG SVS (no 2x level: level 0 is read and box-reduced
2x, `slide.resolution_for(0.5)`), in output tiles (512 x 512 at 0.5 um/px) per second, direct and OpenSlide;
and a pixel check: the readers' level-0 regions (aligned, unaligned and at the slide's edge) and the reduced
tiles must be identical (openslide-python's RGBA composited on white).

    python bench/bench_read.py                 # ~2-3 minutes on 2 cores; bench/results/read_cpu.json
    python bench/bench_read.py --quick --json /tmp/read.json   # seconds: a smoke test (tests/test_bench.py)

The issue's goals: direct >= 5x OpenSlide per thread on JPEG, >= 1.7x from 1 to 2 threads.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from machine import cpu_name  # bench/machine.py: run these scripts as python bench/NAME.py

ROOT = Path(__file__).resolve().parent.parent
FORMAT = "fastgicn-bench-read-1"
GOALS = {"direct_over_openslide_jpeg_per_thread": 5.0, "direct_scaling_2_over_1": 1.7}
TILE = 512
READERS = ("direct", "openslide", "openslide-python")


# -- machine -------------------------------------------------------------------------------------------------
def load_average() -> list[float] | None:
    return [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None


def machine() -> dict:
    cpu = cpu_name()
    try:
        from fastgicn.cpus import usable_cpus

        usable = usable_cpus()
    except Exception:
        usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": cpu, "cores_usable": usable, "cpu_count": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version()}


def versions() -> dict:
    out = {}
    for name in ("openslide", "imagecodecs", "tifffile", "numpy", "fastgicn"):
        try:
            mod = __import__(name)
            out[name] = getattr(mod, "__version__", None)
        except Exception:
            out[name] = None
    try:
        import openslide

        out["libopenslide"] = openslide.__library_version__
    except Exception:
        out["libopenslide"] = None
    try:
        import imagecodecs

        out["libjpeg"] = imagecodecs.jpeg8_version()
        out["openjpeg"] = imagecodecs.jpeg2k_version()
    except Exception:
        pass
    return out


# -- slides --------------------------------------------------------------------------------------------------
def write_slides(work: Path, jpeg_side: int, j2k_side: int, deflate_side: int) -> dict:
    """{name: {"path", "what", "size", "write_seconds"}} for the three slides."""
    sys.path.insert(0, str(ROOT / "tests"))
    from tiff_layouts import Layout, write_layout

    from fastgicn.synth import write_synthetic_slide

    slides = {}
    t0 = time.perf_counter()
    path, mask = write_synthetic_slide(work / "jpeg.svs", jpeg_side, jpeg_side, seed=3, layout="aperio")
    mask.unlink()
    slides["jpeg_svs"] = {"path": str(path), "what": "synthetic JPEG SVS, Aperio layout (1/4/16), 256 tiles",
                          "size": [jpeg_side, jpeg_side], "write_seconds": time.perf_counter() - t0}
    for name, codec, side, svs, what in (
            ("j2k_svs", "j2k_ycbcr", j2k_side, True, "Aperio JPEG 2000 (33003, YCbCr) SVS, 1/4/16, 256 tiles"),
            ("deflate_tiff", "deflate", deflate_side, False, "generic tiled TIFF, deflate 6, 1/4/16, 256 tiles")):
        t0 = time.perf_counter()
        w = write_layout(work / f"{name}.{'svs' if svs else 'tif'}",
                         Layout(name, codec, tile=256, size=(side, side), svs=svs, seed=1))
        slides[name] = {"path": str(w.path), "what": what, "size": [side, side],
                        "write_seconds": time.perf_counter() - t0}
    for info in slides.values():
        info["bytes"] = Path(info["path"]).stat().st_size
    return slides


def grid_positions(width: int, height: int, step: int, limit: int | None) -> list[tuple[int, int]]:
    """Level-0 corners of the full `step` tiles inside the slide, row-major (at most `limit`)."""
    pos = [(x, y) for y in range(0, height - step + 1, step) for x in range(0, width - step + 1, step)]
    return pos[:limit] if limit else pos


# -- readers -------------------------------------------------------------------------------------------------
class Reader:
    """One way of reading 512 x 512 regions of one slide; `read(buf, x, y)` from any thread."""

    def __init__(self, kind: str, path: str):
        self.kind = kind
        if kind == "openslide-python":
            import openslide

            self.handle = openslide.OpenSlide(path)
            self.name = "openslide-python OpenSlide.read_region (PIL RGBA)"
        else:
            from fastgicn.slide import open_slide

            self.handle = open_slide(path, reader=kind)
            if self.handle.reader != kind:
                raise RuntimeError(f"{path}: open_slide(reader={kind!r}) gave reader {self.handle.reader!r}")
            self.name = f"open_slide(reader={kind!r}).read_into"

    def read(self, buf: np.ndarray, x: int, y: int, res=0) -> None:
        if self.kind == "openslide-python":
            self.handle.read_region((x, y), 0, (buf.shape[1], buf.shape[0]))
        else:
            self.handle.read_into(buf, x, y, res)

    def region(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        """RGB level-0 region (openslide-python's RGBA composited on white)."""
        if self.kind == "openslide-python":
            rgba = np.asarray(self.handle.read_region((x, y), 0, (w, h)))
            a = rgba[..., 3:4].astype(np.uint16)
            rgb = (rgba[..., :3].astype(np.uint16) * a + 255 * (255 - a) + 127) // 255
            return rgb.astype(np.uint8)
        return self.handle.read_region(x, y, 0, w, h)

    def close(self) -> None:
        self.handle.close()


def _cpu_seconds() -> float:
    """CPU seconds (user + system) this process has used, all threads."""
    import resource

    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def timed_reads(read, positions, threads: int, out_side: int, cpu: list | None = None) -> float:
    """Seconds for `threads` threads to read `positions` (thread i takes positions[i::threads]); appends the
    process CPU seconds used meanwhile to `cpu` when given."""
    barrier = threading.Barrier(threads + 1)
    errors: list[BaseException] = []

    def work(i: int) -> None:
        buf = np.empty((out_side, out_side, 3), np.uint8)
        mine = positions[i::threads]
        barrier.wait()
        try:
            for x, y in mine:
                read(buf, x, y)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    workers = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(threads)]
    for t in workers:
        t.start()
    barrier.wait()
    c0, t0 = _cpu_seconds(), time.perf_counter()
    for t in workers:
        t.join()
    dt = time.perf_counter() - t0
    if cpu is not None:
        cpu.append(_cpu_seconds() - c0)
    if errors:
        raise errors[0]
    return dt


def _median(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.median(values)) if values else None


def _ratio(a, b):
    return a / b if a and b else None


# -- the run -------------------------------------------------------------------------------------------------
def run(args) -> dict:
    started = time.time()
    record = {"format": FORMAT, "what": __doc__.splitlines()[0],
              "command": "python " + " ".join([os.path.relpath(__file__, ROOT)] + list(args.argv)),
              "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine(), "versions": versions(),
              "load_average": {"start": load_average(), "rounds": []},
              "config": {"tile": TILE, "threads": args.threads, "repeats": args.repeats, "quick": args.quick,
                         "max_tiles": args.max_tiles, "readers": list(READERS)},
              "goals": GOALS}
    with tempfile.TemporaryDirectory(prefix="fastgicn-bench-read-", dir=args.tmp) as tmp:
        work = Path(tmp)
        slides = write_slides(work, args.jpeg_side, args.j2k_side, args.deflate_side)
        record["slides"] = {k: {kk: vv for kk, vv in v.items() if kk != "path"} for k, v in slides.items()}
        readers = {(s, k): Reader(k, info["path"]) for s, info in slides.items() for k in READERS}
        try:
            record["identity"] = check_identity(slides, readers)
            positions = {s: grid_positions(*info["size"], TILE, args.max_tiles) for s, info in slides.items()}
            for s in slides:
                record["slides"][s]["tiles_per_measurement"] = len(positions[s])
            # the resampled path: 512 output tiles at 0.5 um/px = 1024 level-0 pixels of the 0.25 um/px slide
            res_readers = {k: readers[("jpeg_svs", k)] for k in ("direct", "openslide")}
            res = res_readers["direct"].handle.resolution_for(0.5)
            step = int(round(TILE * res.downsample))
            res_positions = grid_positions(*slides["jpeg_svs"]["size"], step, args.max_tiles)
            record["resampled"] = {"slide": "jpeg_svs", "target_mpp": 0.5, "resolution": res.to_dict(0.25),
                                   "output_tile": TILE, "tiles_per_measurement": len(res_positions)}

            # warm up every reader (file in the page cache, decoder state, thread-local buffers)
            for (s, k), r in readers.items():
                timed_reads(r.read, positions[s][:4], 1, TILE)
            samples: dict[tuple, list[float]] = {}
            cpu_samples: dict[tuple, list] = {}
            util_samples: dict[tuple, list] = {}
            pair_ratios: dict[tuple, list[float]] = {}
            for rnd in range(args.repeats):
                for s in slides:
                    order = list(READERS[rnd % len(READERS):] + READERS[:rnd % len(READERS)])
                    for threads in args.threads:
                        got = {}
                        for k in order:
                            cpu: list[float] = []
                            dt = timed_reads(readers[(s, k)].read, positions[s], threads, TILE, cpu)
                            got[k] = len(positions[s]) / dt
                            samples.setdefault((s, k, threads), []).append(got[k])
                            cpu_samples.setdefault((s, k, threads), []).append(
                                len(positions[s]) / cpu[0] if cpu[0] > 0 else None)
                            util_samples.setdefault((s, k, threads), []).append(cpu[0] / dt)
                        for k in ("openslide", "openslide-python"):
                            pair_ratios.setdefault((s, k, threads), []).append(got["direct"] / got[k])
                for threads in args.threads:
                    got = {}
                    for k in (("direct", "openslide") if rnd % 2 == 0 else ("openslide", "direct")):
                        r = res_readers[k]
                        dt = timed_reads(lambda buf, x, y, r=r: r.read(buf, x, y, res), res_positions, threads,
                                         TILE)
                        got[k] = len(res_positions) / dt
                        samples.setdefault(("resampled", k, threads), []).append(got[k])
                    pair_ratios.setdefault(("resampled", "openslide", threads), []).append(
                        got["direct"] / got["openslide"])
                record["load_average"]["rounds"].append(load_average())
                print(f"round {rnd + 1}/{args.repeats} done, load average {load_average()}", flush=True)
        finally:
            for r in readers.values():
                r.close()
    record["load_average"]["end"] = load_average()
    record["results"] = summarise(samples, pair_ratios, list(slides) + ["resampled"], args.threads)
    for s in slides:
        for k in READERS:
            row = record["results"][s]
            row.setdefault("tiles_per_cpu_s_median", {})[k] = {
                str(t): _median(cpu_samples.get((s, k, t), [])) for t in args.threads}
            row.setdefault("cpu_utilisation_median", {})[k] = {
                str(t): _median(util_samples.get((s, k, t), [])) for t in args.threads}
    record["results_note"] = ("tiles_per_s: wall clock; tiles_per_cpu_s: per CPU second of this process (all "
                              "threads), less sensitive to other jobs' load; cpu_utilisation: CPU seconds per wall "
                              "second (about the thread count when the threads run in parallel and the cores are "
                              "free)")
    record["goals_check"] = check_goals(record["results"], args.threads)
    record["total_seconds"] = time.time() - started
    return record


def summarise(samples, pair_ratios, names, thread_counts) -> dict:
    out = {}
    for s in names:
        kinds = ("direct", "openslide") if s == "resampled" else READERS
        row = {"tiles_per_s_median": {}, "tiles_per_s_samples": {}, "direct_over": {}, "scaling_2_over_1": {}}
        for k in kinds:
            row["tiles_per_s_median"][k] = {str(t): _median(samples.get((s, k, t), [])) for t in thread_counts}
            row["tiles_per_s_samples"][k] = {str(t): [round(v, 2) for v in samples.get((s, k, t), [])]
                                             for t in thread_counts}
            if 1 in thread_counts and 2 in thread_counts:
                ones, twos = samples.get((s, k, 1), []), samples.get((s, k, 2), [])
                row["scaling_2_over_1"][k] = _median([b / a for a, b in zip(ones, twos)])
            if k != "direct":
                row["direct_over"][k] = {str(t): _median(pair_ratios.get((s, k, t), [])) for t in thread_counts}
        if s == "resampled":
            row["unit"] = "output tiles (512 x 512 at 0.5 um/px) per second"
        out[s] = row
    return out


def check_goals(results: dict, thread_counts) -> dict:
    jpeg = results.get("jpeg_svs", {})
    per_thread = jpeg.get("direct_over", {}).get("openslide", {})
    g = {}
    vals = [v for v in per_thread.values() if v is not None]
    if vals:
        v = min(vals)
        g["direct_over_openslide_jpeg_per_thread"] = {"value": v, "target": GOALS[
            "direct_over_openslide_jpeg_per_thread"], "met": v >= GOALS["direct_over_openslide_jpeg_per_thread"],
            "note": "the smaller of the 1- and 2-thread ratios"}
    sc = jpeg.get("scaling_2_over_1", {}).get("direct")
    if sc is not None:
        g["direct_scaling_2_over_1"] = {"value": sc, "target": GOALS["direct_scaling_2_over_1"],
                                        "met": sc >= GOALS["direct_scaling_2_over_1"],
                                        "note": "on a machine shared with other jobs this shows the load average"}
    return g


def check_identity(slides: dict, readers: dict) -> dict:
    """Level-0 regions from every reader, and the reduced tiles of direct and OpenSlide, compared."""
    out = {}
    for s, info in slides.items():
        w, h = info["size"]
        where = {"aligned": (TILE, TILE), "unaligned": (137, 91), "edge": (w - 300, h - 200),
                 "beyond": (w - 100, -50)}
        rows = {}
        for name, (x, y) in where.items():
            ref = readers[(s, "openslide")].region(x, y, TILE, TILE)
            row = {}
            for k in ("direct", "openslide-python"):
                got = readers[(s, k)].region(x, y, TILE, TILE)
                diff = int(np.abs(got.astype(np.int16) - ref.astype(np.int16)).max())
                row[k] = {"identical": diff == 0, "max_abs_diff": diff}
            rows[name] = {"l0_xy": [x, y], "against_openslide": row}
        out[s] = rows
    s = "jpeg_svs"
    d, o = readers[(s, "direct")].handle, readers[(s, "openslide")].handle
    res = d.resolution_for(0.5)
    reduced = {}
    for name, (x, y) in {"aligned": (1024, 1024), "unaligned": (333, 77)}.items():
        a, b = np.empty((TILE, TILE, 3), np.uint8), np.empty((TILE, TILE, 3), np.uint8)
        wa, wb = d.read_into(a, x, y, res), o.read_into(b, x, y, o.resolution_for(0.5))
        diff = int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())
        reduced[name] = {"l0_xy": [x, y], "identical": diff == 0 and wa == wb, "max_abs_diff": diff}
    out["resampled_direct_vs_openslide"] = reduced
    out["all_identical"] = all(v["identical"] for rows in list(out.values())[:-1] for r in rows.values()
                               for v in r["against_openslide"].values()) and \
        all(v["identical"] for v in reduced.values())
    return out


def format_summary(record: dict) -> str:
    lines = [f"reading 512^2 tiles on {record['machine']['cpu']} ({record['machine']['cores_usable']} usable cores); "
             f"load average start {record['load_average']['start']} end {record['load_average']['end']}"]
    for s, row in record["results"].items():
        med = row["tiles_per_s_median"]
        parts = []
        for k, by_t in med.items():
            parts.append(f"{k} " + "/".join(f"{v:.0f}" if v else "-" for v in by_t.values()))
        ratios = ", ".join(f"direct/{k} " + "/".join(f"{v:.2f}" if v else "-" for v in by_t.values())
                           for k, by_t in row["direct_over"].items())
        scal = ", ".join(f"{k} {v:.2f}" for k, v in row["scaling_2_over_1"].items() if v)
        lines.append(f"  {s:<13} tiles/s at {'/'.join(map(str, record['config']['threads']))} threads: "
                     f"{'; '.join(parts)}")
        lines.append(f"  {'':<13} {ratios}; 2/1-thread scaling: {scal}")
    lines.append(f"  pixels identical across readers: {record['identity']['all_identical']}")
    for k, g in record["goals_check"].items():
        lines.append(f"  goal {k}: {g['value']:.2f} vs {g['target']} -> {'met' if g['met'] else 'NOT met'}")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small slides, 1 round: a smoke test in seconds")
    p.add_argument("--repeats", type=int, default=None, help="interleaved rounds (default 5; 1 with --quick)")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="reader thread counts (default 1 2)")
    p.add_argument("--jpeg-side", type=int, default=None, help="JPEG SVS side (default 6144; 1536 --quick)")
    p.add_argument("--j2k-side", type=int, default=None, help="JPEG 2000 SVS side (default 3072; 1024 --quick)")
    p.add_argument("--deflate-side", type=int, default=None, help="deflate TIFF side (default 4096; 1024 --quick)")
    p.add_argument("--max-tiles", type=int, default=None, help="at most this many tiles per measurement")
    p.add_argument("--tmp", default=None, help="directory for the slides (default: the system's)")
    p.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "read_cpu.json")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    q = args.quick
    args.repeats = args.repeats or (1 if q else 5)
    args.jpeg_side = args.jpeg_side or (1536 if q else 6144)
    args.j2k_side = args.j2k_side or (1024 if q else 3072)
    args.deflate_side = args.deflate_side or (1024 if q else 4096)
    if args.max_tiles is None and q:
        args.max_tiles = 4
    if min(args.jpeg_side, args.j2k_side, args.deflate_side) < 1024:
        p.error("slide sides must be at least 1024 (two 512 tiles, and a 1024 reduced tile)")
    if any(t < 1 for t in args.threads):
        p.error("--threads: positive integers")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    record = run(args)
    print(format_summary(record))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(record, indent=1, default=str) + "\n")
    print(f"wrote {args.json} ({record['total_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
