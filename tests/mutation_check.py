"""The mutation check: one-line bugs the test suite must catch (issue 10), applied one at a time to a copy of the
repository, each followed by the tests that must fail on it.

    python tests/mutation_check.py                      # every mutation; writes bench/results/mutation_score.json
    python tests/mutation_check.py --only M05 M12       # some of them (nothing written unless --json is given)

The copy holds what `git ls-files` lists (tracked files and untracked ones that are not ignored, so new tests come
along) and the built extension modules; the tests run there with `PYTHONPATH` pointing at the copy, and the script
first checks that the copy's fastgicn is the one imported (not the editable install) and that every listed test
passes unmutated. A mutation whose original text is not found exactly once in its file is an error, not a pass:
when code moves, move the mutation with it. Not collected by pytest (the name does not start with test_).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULT = ROOT / "bench" / "results" / "mutation_score.json"
T = "tests/test_catches_mutations.py::"
LEVEL1 = T + "test_level1_and_reduced_reads_equal_the_model_on_the_whole_level1_image[level1-crop]"
REDUCED = T + "test_level1_and_reduced_reads_equal_the_model_on_the_whole_level1_image[reduced-crop]"
COUNTS = T + "test_report_counts_equal_the_tiles_counted_here"
PREFILTER = T + "test_prefilter_candidates_are_the_tiles_touching_the_tissue_grown_by_one_mask_pixel"
RESUME = T + "test_resume_redoes_another_config_stitch_or_slide_and_a_truncated_output"
KILL = T + "test_kill_9_mid_write_then_the_rerun_redoes_the_unfinished_and_the_truncated"
TRAIN = T + "test_train_then_resume_then_segment_with_the_checkpoint"
RESOLUTION = T + "test_output_tiffs_carry_x_and_y_resolution_of_every_level"
FUZZ_TARGETED = "tests/test_fuzz_slides.py::test_known_harmful_bit_flips_are_refused_quickly"
CLI_DEMO = "tests/test_cli_segment.py::test_demo_makes_a_synthetic_slide_segments_it_with_truth_and_reuses_it"


@dataclass(frozen=True)
class Mutation:
    id: str
    what: str
    file: str
    original: str
    mutated: str
    tests: tuple[str, ...]


MUTATIONS = [
    # the ones issue 10 lists
    Mutation("M01", "the report's segmented count is the read count", "fastgicn/outputs/report.py",
             '"segmented": n_read - n_rejected,', '"segmented": n_read,', (COUNTS,)),
    Mutation("M02", "GeoJSON areas computed with the output MPP (not level 0's)", "fastgicn/slide_job.py",
             "mpp=src.mpp, min_region_um2=self.min_region_um2,", "mpp=self.out_mpp, min_region_um2=self.min_region_um2,",
             (LEVEL1,)),
    Mutation("M03", "white_threshold not passed on to the batch reader", "fastgicn/slide_job.py",
             "white_threshold=config.white_threshold, pin=", "pin=", (COUNTS,)),
    Mutation("M04", "min_tissue_fraction not passed on to the batch reader", "fastgicn/slide_job.py",
             "ring=ring, min_tissue_fraction=config.min_tissue_fraction,", "ring=ring,", (COUNTS,)),
    Mutation("M05", "the tissue prefilter's margin changed", "fastgicn/tiling/grid.py",
             "workers: int = 1, margin: int = 1,", "workers: int = 1, margin: int = 0,", (PREFILTER,)),
    Mutation("M06", "outputs_complete ignores the file sizes", "fastgicn/outputs/report.py",
             'if p.stat().st_size != info["bytes"]:', "if p.stat().st_size < 0:", (RESUME, KILL)),
    Mutation("M07", "the run fingerprint ignores the stitch mode", "fastgicn/cohort.py",
             '"stitch": stitch, "format": REPORT_FORMAT', '"stitch": None, "format": REPORT_FORMAT', (RESUME,)),
    Mutation("M08", "the run fingerprint ignores a replaced slide of the same size", "fastgicn/cohort.py",
             "f\"{ident['bytes']}:{ident['content']}\"", "f\"{ident['bytes']}\"", (RESUME,)),
    Mutation("M09", "resume drops the metrics", "fastgicn/train/trainer.py",
             'payload["iteration"], list(payload["metrics"])', 'payload["iteration"], []', (TRAIN,)),
    Mutation("M10", "the train CLI stores target_mpp without the downsample", "fastgicn/cli/train.py",
             "target_mpp=mpp * args.downsample)", "target_mpp=mpp)", (TRAIN,)),
    Mutation("M11", "TIFF X and Y resolution swapped", "fastgicn/outputs/tiff.py",
             "(1e4 / (mpp * width / w), 1e4 / (mpp * height / h))",
             "(1e4 / (mpp * height / h), 1e4 / (mpp * width / w))", (RESOLUTION,)),
    Mutation("M12", "stitching at level-0 coordinates on a level-1 read", "fastgicn/slide_job.py",
             "np.rint(candidates[:, :2] / ds)", "np.rint(candidates[:, :2] / 1.0)", (LEVEL1,)),
    Mutation("M13", "the truth-Dice row not scaled to level 0", "fastgicn/outputs/dice.py",
             "int(round(y0 * self.downsample))", "int(round(y0))", (LEVEL1, CLI_DEMO)),
    # every TileConfig field reaches its stage
    Mutation("M14", "tissue_prefilter ignored", "fastgicn/tiling/grid.py",
             "if config.tissue_prefilter:", "if True:", (PREFILTER,)),
    Mutation("M15", "batch_size not passed on to the batch reader", "fastgicn/slide_job.py",
             "tile_size=t, batch_size=config.batch_size,", "tile_size=t, batch_size=8,", (COUNTS,)),
    Mutation("M16", "overlap ignored by the tile grid", "fastgicn/tiling/grid.py",
             "config.tile_size, config.stride, level.downsample", "config.tile_size, config.tile_size, level.downsample",
             (LEVEL1,)),
    Mutation("M17", "level ignored", "fastgicn/tiling/grid.py",
             "return stored(slide, config.level)", "return stored(slide, 0)", (LEVEL1,)),
    Mutation("M18", "target_mpp ignored", "fastgicn/tiling/grid.py",
             "return slide.resolution_for(target_mpp=config.target_mpp)", "return stored(slide, 0)", (REDUCED,)),
    # what the fuzz test found, and the tests made to fail on their own output before
    Mutation("M19", "a damaged tile grid handed to OpenSlide", "fastgicn/slide/open.py",
             "    if grids:  # before OpenSlide", "    if False:  # before OpenSlide", (FUZZ_TARGETED,)),
    Mutation("M20", "a JPEG 2000 tile decoded before its declared size is checked", "fastgicn/slide/direct.py",
             "_check_j2k_size(data, shape)  # before decoding", "pass  # before decoding", (FUZZ_TARGETED,)),
    Mutation("M21", "GeoJSON areas in um (mpp once, not squared)", "fastgicn/outputs/geojson.py",
             "shapely.area(geoms) * mpp * mpp, 2)", "shapely.area(geoms) * mpp, 2)",
             ("tests/test_polygons.py::test_geojson_rasterises_back_in_level0_coordinates",)),
    Mutation("M22", "the overlay's tint strength changed", "fastgicn/outputs/overlay.py",
             "alpha: float = 0.45", "alpha: float = 0.6",
             ("tests/test_outputs.py::test_overlay_tints_tumour_and_keeps_the_rest",)),
    Mutation("M23", "the benchmark's end-to-end section always unavailable", "fastgicn/bench/backends.py",
             'return {"available": True, "slide"', 'return {"available": False, "slide"',
             ("tests/test_bench.py::test_bench_runs_end_to_end_and_writes_valid_json",)),
    Mutation("M24", "regions crossing a strip cut traced in pieces", "fastgicn/outputs/polygons.py",
             "strip[ya - a:yb - a, c0:c1] &= ~crossing[labels[ya:yb, c0:c1]]", "pass",
             ("tests/test_polygons.py::test_strips_on_threads_give_the_regions_of_one_trace",)),
    Mutation("M25", "specks dropped before tracing without the rounding slack", "fastgicn/outputs/polygons.py",
             "gone = area + slack < min_area", "gone = area - slack < min_area",
             ("tests/test_polygons.py::test_a_region_at_the_threshold_is_decided_on_its_polygon",)),
]


def copy_repository(dest: Path) -> int:
    """The files `git ls-files` lists (tracked, and untracked but not ignored) and the built extensions."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    built = [str(p.relative_to(ROOT)) for p in (ROOT / "fastgicn").rglob("*.so")]
    n = 0
    for rel in sorted(set(filter(None, listed)) | set(built)):
        src = ROOT / rel
        if not src.is_file():  # deleted in the working tree
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest / rel)
        n += 1
    return n


def environment(copy: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTEST_ADDOPTS",)}
    env["PYTHONPATH"] = str(copy) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # a restored file is recompiled, never served from a stale .pyc
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def run_tests(copy: Path, env: dict, tests, timeout: float) -> tuple[int, float, str]:
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "--no-header", *tests]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True, timeout=timeout, check=False)
        rc, out = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        rc, out = -1, f"timed out after {timeout} s\n{exc.stdout or ''}"
    return rc, time.perf_counter() - t0, out


def check_imports_the_copy(copy: Path, env: dict) -> str:
    code = "import fastgicn, fastgicn.pipeline as p; print(fastgicn.__file__); print(p.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=copy, env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    for path in out:
        if not Path(path).resolve().is_relative_to(copy.resolve()):
            raise SystemExit(f"the copy imports {path}, not its own fastgicn: the check would test the wrong code")
    return out[0]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", default=None, metavar="ID", help="run only these mutations (M01 ...)")
    ap.add_argument("--json", type=Path, default=None,
                    help=f"where to write the score (default: {RESULT.relative_to(ROOT)} for a full run)")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per test run (default: 600)")
    ap.add_argument("--keep", action="store_true", help="keep the copy (its path is printed)")
    args = ap.parse_args(argv)
    chosen = [m for m in MUTATIONS if args.only is None or m.id in args.only]
    if args.only is not None and len(chosen) != len(set(args.only)):
        raise SystemExit(f"unknown mutation ids {sorted(set(args.only) - {m.id for m in MUTATIONS})}")
    out_json = args.json or (RESULT if args.only is None else None)
    copy = Path(tempfile.mkdtemp(prefix="fastgicn_mutations_"))
    results = []
    t_start = time.perf_counter()
    try:
        n_files = copy_repository(copy)
        env = environment(copy)
        imported = check_imports_the_copy(copy, env)
        print(f"copied {n_files} files to {copy}; fastgicn imported from {imported}", flush=True)
        tests = sorted({t for m in chosen for t in m.tests})
        rc, secs, out = run_tests(copy, env, tests, args.timeout * 2)
        if rc != 0:
            print(out[-4000:])
            raise SystemExit(f"the listed tests fail without any mutation (exit status {rc}): fix them first")
        print(f"baseline: {len(tests)} tests pass unmutated ({secs:.0f} s)", flush=True)
        for m in chosen:
            path = copy / m.file
            text = path.read_text(encoding="utf-8")
            found = text.count(m.original)
            row = {"id": m.id, "what": m.what, "file": m.file, "original": m.original, "mutated": m.mutated,
                   "tests": list(m.tests)}
            if found != 1:
                row.update(status="error", reason=f"original text found {found} times (must be exactly once)")
            else:
                path.write_text(text.replace(m.original, m.mutated), encoding="utf-8")
                try:
                    rc, secs, out = run_tests(copy, env, m.tests, args.timeout)
                finally:
                    path.write_text(text, encoding="utf-8")
                # 1: a test failed; 2: collection or the run was interrupted by an error. 4/5: the ids do not
                # name tests (usage error, nothing collected); -1: timed out: none of those is a catch
                status = "caught" if rc in (1, 2) else ("missed" if rc == 0 else "error")
                failed = [line for line in out.splitlines() if line.startswith(("FAILED", "ERROR"))]
                row.update(status=status, exit_status=rc, seconds=round(secs, 1), failed=failed[:3])
                if status != "caught":
                    row["output_tail"] = out[-2000:]
            results.append(row)
            print(f"{m.id} {row['status']:>6}  {m.what}  ({row.get('seconds', 0):.0f} s)", flush=True)
    finally:
        if args.keep:
            print(f"copy kept in {copy}")
        else:
            shutil.rmtree(copy, ignore_errors=True)
    caught = sum(r["status"] == "caught" for r in results)
    print(f"mutation score: {caught}/{len(results)} caught")
    if out_json is not None:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=False).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                    capture_output=True, text=True, check=False).stdout.strip())
        score = {"format": "fastgicn-mutation-score-1",
                 "command": "python tests/mutation_check.py" + (f" --only {' '.join(args.only)}" if args.only else ""),
                 "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "git_head": head, "working_tree_modified": dirty,
                 "python": platform.python_version(), "seconds": round(time.perf_counter() - t_start, 1),
                 "caught": caught, "total": len(results), "score": caught / len(results) if results else None,
                 "mutations": results}
        out_json.parent.mkdir(parents=True, exist_ok=True)
        out_json.write_text(json.dumps(score, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        print(f"wrote {out_json}")
    return 0 if caught == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
