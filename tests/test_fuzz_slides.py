"""Fuzzed slides: a few hundred copies of small SVS / TIFF slides (JPEG, JPEG 2000, deflate), truncated or with
one bit flipped at a seeded random offset (in the TIFF header, the IFDs, the tile offset and byte-count tables,
the tile data, anywhere), each opened and read in full (level 0, the coarsest level, level 0 reduced 2x) in a
worker process with a per-slide timeout, and a few segmented end to end with a tiny model.

Every case ends in a result or in a `SlideError` naming the file: never another exception type, a crash of the
worker, or a hang. A result must be the pristine slide's pixels where the file gives a way to know better:
after a truncation, and after a flip in a lossless (deflate) slide's tile data, offsets or byte counts (zlib's
checksum covers every tile). Elsewhere a TIFF has no checksum (a flipped bit in a JPEG tile or in a tag value
can change pixels undetectably), so a result there only has to be a well-formed read.

Reproducible: the cases are a pure function of `SEED`; a failure names the case (base, index, kind, byte, bit)."""
from __future__ import annotations

import hashlib
import multiprocessing
import os
import random
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import tifffile

from fastgicn.errors import FastGicnError, SlideError
from fastgicn.slide import Resolution, open_slide

SEED = 20261122
CASES_PER_BASE = 100         # 4 bases: 400 slides
CASE_TIMEOUT_S = 20.0        # per slide, generous for a busy 2-core machine (a case takes ~10 ms)
KINDS = ("truncate", "header", "ifd", "offsets", "counts", "data", "anywhere")


# ---------------------------------------------------------------------------------------------------
# the worker: opens and reads one file, in its own process (spawned: no torch, no inherited threads)

def _digest(a: np.ndarray) -> str:
    return f"{a.shape}:{hashlib.sha1(np.ascontiguousarray(a).tobytes()).hexdigest()}"


def read_case(path: str) -> dict:
    """Open `path` and read level 0, the coarsest level and level 0 reduced 2x; what happened, as plain data."""
    try:
        with open_slide(path) as slide:
            w, h = slide.dimensions
            level0 = slide.read_level(0)
            last = slide.read_level(slide.level_count - 1)
            half = np.empty(((h + 1) // 2, (w + 1) // 2, 3), np.uint8)
            slide.read_into(half, 0, 0, Resolution(0, 2.0, 1.0, (w, h)))
            return {"status": "ok", "reader": slide.reader, "levels": [list(d) for d in slide.level_dimensions],
                    "level0": _digest(level0), "last": _digest(last), "half": _digest(half)}
    except FastGicnError as exc:
        return {"status": "error", "type": type(exc).__name__, "message": str(exc)}
    except BaseException as exc:  # noqa: BLE001 - what the test is looking for
        import traceback

        return {"status": "error", "type": type(exc).__name__, "message": str(exc),
                "traceback": traceback.format_exc()}


def _serve(conn) -> None:
    import logging

    logging.disable(logging.WARNING)  # tifffile logs every broken tag it meets: noise here
    conn.send("ready")                # numpy, OpenSlide, tifffile and fastgicn are imported
    while True:
        path = conn.recv()
        if path is None:
            return
        conn.send(read_case(path))


class Worker:
    """`run(path)` reads a file in a child process; a case that takes longer than `timeout` or kills the
    process is reported as such (and the child replaced), so one bad file cannot hang or end the test run."""

    def __init__(self, timeout: float = CASE_TIMEOUT_S):
        self.timeout = timeout
        self._ctx = multiprocessing.get_context("spawn")
        self._start()

    def _start(self) -> None:
        self._conn, child = self._ctx.Pipe()
        self._proc = self._ctx.Process(target=_serve, args=(child,), daemon=True)
        self._proc.start()
        child.close()
        self._ready = False

    def _restart(self) -> None:
        self._proc.kill()
        self._proc.join()
        self._conn.close()
        self._start()

    def run(self, path: Path, timeout: float | None = None) -> dict:
        timeout = self.timeout if timeout is None else timeout
        try:
            if not self._ready:  # a new child imports its modules first (seconds on a busy machine)
                if not self._conn.poll(120) or self._conn.recv() != "ready":
                    raise EOFError
                self._ready = True
            self._conn.send(str(path))
            if not self._conn.poll(timeout):
                self._restart()
                return {"status": "timeout", "type": "timeout", "message": f"no answer in {timeout:g} s"}
            return self._conn.recv()
        except (EOFError, OSError):
            code = self._proc.exitcode
            self._restart()
            return {"status": "crash", "type": "crash", "message": f"the reader process died (exit code {code})"}

    def close(self) -> None:
        try:
            self._conn.send(None)
            self._proc.join(10)
        except OSError:
            pass
        finally:
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join()
            self._conn.close()


# ---------------------------------------------------------------------------------------------------
# the slides and their damaged copies

def byte_regions(path: Path) -> dict[str, list[tuple[int, int]]]:
    """[start, end) byte ranges of the file's parts, from tifffile's parse of the intact (classic) TIFF."""
    regions: dict[str, list[tuple[int, int]]] = {k: [] for k in KINDS}
    size = path.stat().st_size
    regions["header"] = [(0, 8)]
    regions["anywhere"] = [(0, size)]
    with tifffile.TiffFile(path) as tf:
        for page in tf.pages:
            regions["ifd"].append((page.offset, page.offset + 2 + 12 * len(page.tags) + 4))
            for tag in page.tags:
                if tag.code in (324, 273):    # TileOffsets / StripOffsets
                    regions["offsets"].append((tag.valueoffset, tag.valueoffset + 4 * tag.count))
                elif tag.code in (325, 279):  # TileByteCounts / StripByteCounts
                    regions["counts"].append((tag.valueoffset, tag.valueoffset + 4 * tag.count))
            regions["data"] += [(int(o), int(o + n)) for o, n in zip(page.dataoffsets, page.databytecounts) if n]
    return regions


def damaged_copies(name: str, path: Path, out_dir: Path, n: int, seed: int) -> list[dict]:
    """`n` seeded copies of `path`: truncated at a random byte, or one bit flipped in a random part."""
    data = path.read_bytes()
    regions = byte_regions(path)
    rng = random.Random(f"{seed}:{name}")
    cases = []
    for i in range(n):
        kind = KINDS[i % len(KINDS)]
        buf = bytearray(data)
        if kind == "truncate":
            offset, bit = rng.randrange(8, len(data)), None
            del buf[offset:]
        else:
            start, end = rng.choice(regions[kind])
            offset, bit = rng.randrange(start, end), rng.randrange(8)
            buf[offset] ^= 1 << bit
        case_path = out_dir / f"{name}_{i:03d}_{kind}{path.suffix}"
        case_path.write_bytes(bytes(buf))
        cases.append({"id": f"{name}[{i}] {kind} at byte {offset}" + (f" bit {bit}" if bit is not None else ""),
                      "base": name, "kind": kind, "path": case_path})
    return cases


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, dict]:
    from tiff_layouts import Layout, write_layout

    from fastgicn.synth import write_synthetic_slide

    d = tmp_path_factory.mktemp("fuzz_bases")
    paths = {
        # an Aperio layout (levels 1/4/16, thumbnail, label, macro), JPEG with shared tables
        "svs_jpeg": write_synthetic_slide(d / "svs_jpeg.svs", 512, 384, seed=1, min_level_size=64)[0],
        "tif_jpeg": write_synthetic_slide(d / "tif_jpeg.tif", 448, 320, seed=2, min_level_size=64)[0],
        "svs_j2k": write_layout(d / "svs_j2k.svs", Layout("fuzz_j2k", "j2k_ycbcr", tile=240, size=(400, 300),
                                                          downsamples=(1, 4), svs=True, seed=7)).path,
        "tif_deflate": write_layout(d / "tif_deflate.tif", Layout("fuzz_deflate", "deflate", tile=128,
                                                                  size=(360, 280), downsamples=(1, 2),
                                                                  seed=9)).path,
    }
    return {name: {"path": p, "lossless": name.endswith("deflate")} for name, p in paths.items()}


def test_damaged_slides_read_correctly_or_fail_with_a_slide_error_naming_the_file(bases, tmp_path):
    worker = Worker()
    failures, outcomes = [], Counter()
    try:
        pristine = {}
        for name, base in bases.items():
            r = worker.run(base["path"])
            assert r["status"] == "ok" and r["reader"] == "direct", (name, r)
            pristine[name] = r
        for name, base in bases.items():
            for case in damaged_copies(name, base["path"], tmp_path, CASES_PER_BASE, SEED):
                r = worker.run(case["path"])
                outcomes[name, r["status"]] += 1
                why = judge(case, r, pristine[name], base["lossless"])
                if why:
                    failures.append(f"{case['id']}: {why}")
                else:
                    case["path"].unlink()
    finally:
        worker.close()
    assert not failures, f"{len(failures)} of {len(bases) * CASES_PER_BASE} cases:\n" + "\n".join(failures[:30])
    # the damage is real: a good share of each base's copies is refused, and some read
    for name in bases:
        assert outcomes[name, "error"] >= CASES_PER_BASE // 4, outcomes
        assert outcomes[name, "ok"] >= 1, outcomes


def judge(case: dict, r: dict, pristine: dict, lossless: bool) -> str | None:
    """Why the outcome `r` of `case` is wrong, or None."""
    if r["status"] in ("timeout", "crash"):
        return r["message"]
    if r["status"] == "error":
        if r["type"] != "SlideError":
            return f"{r['type']} (not SlideError): {r['message']}\n{r.get('traceback', '')}"
        if str(case["path"]) not in r["message"]:
            return f"the SlideError does not name the file: {r['message']}"
        return None
    exact = case["kind"] == "truncate" or (lossless and case["kind"] in ("data", "offsets", "counts"))
    if exact:
        for key in ("levels", "level0", "half", "last"):
            if r[key] != pristine[key]:
                return f"read without an error but {key} differs from the intact slide's"
    return None


def flip_high_bit(data: bytearray, offset: int, nbytes: int) -> None:
    """Flip the second-highest bit of the little-endian unsigned integer of `nbytes` at `offset`."""
    data[offset + nbytes - 1] ^= 0x40


def targeted_copies(bases: dict, out_dir: Path) -> list[dict]:
    """Bit flips found to do harm, placed by parsing the file: a tile width of a billion pixels (OpenSlide
    allocates the tile and GLib aborts the process), a level-0 width far beyond its tiles, and a JPEG 2000
    tile header claiming millions of rows (gigabytes decoded before the size is checked)."""
    cases = []
    for name, page, code, what in (("svs_j2k", 1, 322, "tile width"), ("svs_jpeg", 0, 256, "image width"),
                                   ("tif_deflate", 1, 257, "image length")):
        path = bases[name]["path"]
        with tifffile.TiffFile(path) as tf:
            tag = tf.pages[page].tags[code]
            offset, nbytes = tag.valueoffset, {3: 2, 4: 4, 16: 8}[int(tag.dtype)]
        data = bytearray(path.read_bytes())
        flip_high_bit(data, offset, nbytes)
        cases.append({"id": f"{name}: {what} of page {page}", "path": out_dir / f"targeted_{name}_{code}{path.suffix}",
                      "data": data})
    path = bases["svs_j2k"]["path"]
    with tifffile.TiffFile(path) as tf:
        tile = int(tf.pages[0].dataoffsets[1])
    data = bytearray(path.read_bytes())
    assert data[tile:tile + 4] == b"\xff\x4f\xff\x51"     # a bare codestream: SOC, then SIZ
    data[tile + 13] ^= 0x40                                 # Ysiz (bytes 12-15, big-endian) + 2^22 rows
    cases.append({"id": "svs_j2k: JPEG 2000 SIZ height of a level-0 tile", "path": out_dir / "targeted_j2k_siz.svs",
                  "data": data})
    for case in cases:
        case["path"].write_bytes(bytes(case.pop("data")))
    return cases


def test_known_harmful_bit_flips_are_refused_quickly(bases, tmp_path):
    worker = Worker()
    try:
        for case in targeted_copies(bases, tmp_path):
            t0 = time.monotonic()
            r = worker.run(case["path"], timeout=10.0)
            assert r["status"] == "error" and r["type"] == "SlideError", (case["id"], r)
            assert str(case["path"]) in r["message"] and "corrupt" in r["message"], (case["id"], r["message"])
            assert time.monotonic() - t0 < 10.0, case["id"]
    finally:
        worker.close()


def test_the_worker_turns_a_hang_and_a_crash_into_a_failure_not_a_wait(tmp_path):
    """The harness itself: a read that never returns is a timeout, a dead reader process a crash."""
    fifo = tmp_path / "never.svs"
    os.mkfifo(fifo)                 # opening a FIFO nobody writes to blocks: a real hang
    worker = Worker(timeout=1.0)
    try:
        assert worker.run(tmp_path / "missing.svs")["type"] == "SlideError"
        t0 = time.monotonic()
        assert worker.run(fifo)["status"] == "timeout" and time.monotonic() - t0 < 30
        assert worker.run(tmp_path / "missing.svs")["type"] == "SlideError"   # a fresh child serves again
        worker._proc.kill()
        worker._proc.join()
        assert worker.run(tmp_path / "missing.svs")["status"] == "crash"
        assert worker.run(tmp_path / "missing.svs")["type"] == "SlideError"
    finally:
        worker.close()


# ---------------------------------------------------------------------------------------------------
# end to end: a few damaged slides through segment_slide

def dark_model():
    """Tumour where a pixel is darker than 60 % grey (torch imported here: the reader worker imports this
    module and needs none of it)."""
    import torch
    from torch import nn

    class Dark(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Conv2d(3, 2, 1)
            self.mean, self.std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
            self.model_name, self.model_kwargs = "fuzz_dark", {}

        def forward(self, x):
            grey = x.mean(dim=1, keepdim=True)
            return torch.cat([grey - 0.6, 0.6 - grey], dim=1) * 20

    return Dark()


@pytest.mark.timeout(300)   # the hang guard here (pytest-timeout): the pipeline runs in this process
@pytest.mark.usefixtures("one_torch_thread")
def test_a_few_damaged_slides_segment_end_to_end_or_fail_cleanly(bases, tmp_path):
    from fastgicn import TileConfig, segment_slide

    model = dark_model()
    config = TileConfig(tile_size=128, overlap=0, level=0, batch_size=4)
    rng = random.Random(SEED)
    outcomes = Counter()
    for name, base in bases.items():
        cases = damaged_copies(name, base["path"], tmp_path, 14, SEED + 1)
        for case in rng.sample(cases, 4):
            out = tmp_path / f"out_{case['path'].stem}"
            try:
                res = segment_slide(case["path"], out, model, config, threads=1, progress=False)
            except SlideError as exc:
                assert str(case["path"]) in str(exc), (case["id"], str(exc))
                assert not any(out.glob("*.report.json")), case["id"]   # no report: nothing looks complete
                assert not [p for p in out.iterdir() if p.name.startswith(".")], case["id"]  # no temporary
                outcomes["error"] += 1
                continue
            except FastGicnError as exc:
                pytest.fail(f"{case['id']}: {type(exc).__name__}, not SlideError: {exc}")
            assert res.status == "done" and res.report["complete"], case["id"]
            w, h = res.report["read"]["dimensions"]
            with tifffile.TiffFile(res.outputs["mask"]) as tf:
                assert tf.pages[0].shape == (h, w), case["id"]
            outcomes["done"] += 1
    assert outcomes["error"] >= 1 and outcomes["done"] >= 1, outcomes
