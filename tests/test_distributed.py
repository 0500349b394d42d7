"""Many slides on a real local Ray cluster (`ray.init(num_cpus=2)`, started once for the module): the same
outputs as a plain run, a corrupt slide, a worker killed mid-slide, a driver killed mid-run; the plain run's
prefetching; and the plain path never imports Ray."""
from __future__ import annotations

import io
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import ray
import tifffile
import torch

from fastgicn.cli import main
from fastgicn.config import TileConfig
from fastgicn.distributed import RUN_SUMMARY_NAME, ClusterRun
from fastgicn.distributed.progress import ClusterProgress
from fastgicn.models import create_model
from fastgicn.naming import FAILURES_NAME
from fastgicn.pipeline import SlideJob, outputs_complete, segment_slides
from fastgicn.synth import write_synthetic_slide
from fastgicn.train import save_checkpoint
from tiny_models import register

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TESTS = Path(__file__).resolve().parent
TINY = register("distributed_test_tiny")  # tests/tiny_models.py: one convolution
CONFIG = TileConfig(tile_size=128, overlap=16, level=0, batch_size=4)
# the workers import tiny_models (the model is pickled by reference to its class)
PYTHONPATH = os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH", "")) if p)
SLOW_ENV = {"env_vars": {"PYTHONPATH": PYTHONPATH, "FASTGICN_TEST_SLOW": "0.15"}}  # 0.15 s a batch


@pytest.fixture(scope="module")
def cluster():
    ctx = ray.init(num_cpus=2, num_gpus=0, object_store_memory=80 * 2 ** 20, include_dashboard=False,
                   runtime_env={"env_vars": {"PYTHONPATH": PYTHONPATH}}, log_to_driver=False)
    yield ctx
    ray.shutdown()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create_model(TINY)


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    d = tmp_path_factory.mktemp("slides")
    return [write_synthetic_slide(d / f"s{i}.svs", 768, 512, seed=i, min_level_size=256)[0] for i in range(4)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, slides, model):
    """The plain serial run (no overlap between slides): what every other run must write."""
    out = tmp_path_factory.mktemp("plain")
    results = segment_slides(slides, out, model, CONFIG, overlap=False, progress=False, log=lambda m: None)
    assert [r.status for r in results] == ["done"] * len(slides)
    return out


def assert_same_outputs(out, ref, stems):
    for stem in stems:
        for suffix in (".tumour_mask.tif", ".tumour_probability.tif"):
            a, b = tifffile.imread(out / f"{stem}{suffix}"), tifffile.imread(ref / f"{stem}{suffix}")
            assert a.shape == b.shape and np.array_equal(a, b), f"{stem}{suffix} differs from the plain run"
        assert (out / f"{stem}.tumour.geojson").read_bytes() == (ref / f"{stem}.tumour.geojson").read_bytes()
        assert outputs_complete(out, stem)
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")], "temporaries left behind"


def summary(out) -> dict:
    return json.loads((out / RUN_SUMMARY_NAME).read_text())


def test_plain_prefetching_run_equals_the_serial_run(tmp_path, slides, reference, model):
    """The default multi-slide run prepares the next slide and finishes the last one on other threads; the
    device loops stay one after the other, in order, and the outputs are the serial run's."""
    results = segment_slides(slides, tmp_path, model, CONFIG, progress=False, log=lambda m: None)
    assert [r.status for r in results] == ["done"] * len(slides)
    windows = [r.forward_window for r in results]
    assert all(a[0] <= a[1] <= b[0] for a, b in itertools.pairwise(windows))
    assert_same_outputs(tmp_path, reference, [s.stem for s in slides])


def test_a_prepared_slide_that_never_runs_leaves_nothing(tmp_path, slides, model):
    """Ctrl-C while the next slide is prepared: its readers are stopped, its partial outputs removed."""
    job = SlideJob(slides[0], tmp_path, model, CONFIG, threads=1, ring=1).prepare()  # the ring holds 4 tiles
    assert len(job.candidates) > 4
    assert list(tmp_path.glob(".*.partial")) and job.batches.alive_threads
    job.abort()
    assert list(tmp_path.iterdir()) == [] and not job.batches.alive_threads
    assert not [t for t in threading.enumerate() if t.name.startswith("fastgicn-")]


def test_cli_ray_run_equals_the_plain_run_and_skips_a_corrupt_slide(tmp_path, cluster, slides, reference,
                                                                    model, capsys):
    ckpt = tmp_path / "tiny.pt"
    save_checkpoint(ckpt, model, tile_config=CONFIG)
    bad = tmp_path / "corrupt.svs"
    bad.write_bytes(b"II*\x00" + os.urandom(3000))
    out = tmp_path / "out"
    argv = ["segment", *map(str, [slides[0], bad, *slides[1:]]), "-o", str(out), "--weights", str(ckpt),
            "--no-progress", "--ray", "local", "--workers", "2"]
    assert main(argv) == 1  # a slide failed
    cap = capsys.readouterr()
    assert "corrupt.svs: FAILED" in cap.out and "corrupt.svs" in cap.err
    assert_same_outputs(out, reference, [s.stem for s in slides])
    assert not list(out.glob("corrupt*"))
    assert "corrupt.svs" in (out / FAILURES_NAME).read_text()
    run = summary(out)
    assert run["counts"] == {"done": 4, "skipped": 0, "failed": 1}
    by_slide = {Path(s["slide"]).name: s for s in run["slides"]}
    assert by_slide["corrupt.svs"]["status"] == "failed" and by_slide["corrupt.svs"]["error"]
    workers = {w["worker"]: w for w in run["workers"]}
    # two were started; on a busy machine the first one ready may do every slide before the second is up
    assert 1 <= len(workers) <= 2 and all(w["device"] == "cpu" and w["pid"] for w in workers.values())
    for s in slides:
        rec = by_slide[s.name]
        assert rec["status"] == "done" and rec["worker"] in workers and rec["node"] and rec["seconds"] > 0
        assert rec["attempts"] == 1 and rec["tiles"] > 0
    # --workers without --ray is refused (exit status 2, one line)
    assert main(argv[:-4] + ["--workers", "2"]) == 2 and "--workers" in capsys.readouterr().err
    # the same command again: every finished slide is skipped, the corrupt one fails again
    assert main(argv) == 1
    run = summary(out)
    assert run["counts"] == {"done": 0, "skipped": 4, "failed": 1}


def test_workers_build_the_backend_asked_for(tmp_path, cluster, slides, model, capsys):
    """--backend onnxruntime: each worker builds it (not the driver); the masks are the plain run's with it."""
    pytest.importorskip("onnxruntime")  # the `onnx` extra
    ckpt = tmp_path / "tiny.pt"
    save_checkpoint(ckpt, model, tile_config=CONFIG)
    common = [*map(str, slides[:2]), "--weights", str(ckpt), "--no-progress", "--backend", "onnxruntime"]
    assert main(["segment", *common, "-o", str(tmp_path / "ray"), "--ray", "local", "--workers", "1"]) == 0
    assert "built by each Ray worker" in capsys.readouterr().err
    assert main(["segment", *common, "-o", str(tmp_path / "plain")]) == 0
    assert_same_outputs(tmp_path / "ray", tmp_path / "plain", [s.stem for s in slides[:2]])


def test_a_worker_killed_mid_slide_has_its_slides_retried(tmp_path, cluster, slides, reference, model):
    out = tmp_path / "out"
    log: list[str] = []
    run = ClusterRun(slides, out, model, CONFIG, workers=2, runtime_env=SLOW_ENV, log=log.append,
                     progress=False)
    results: list = []
    driver = threading.Thread(target=lambda: results.extend(run.run()))
    driver.start()
    victim = None
    deadline = time.monotonic() + 60
    while victim is None and time.monotonic() < deadline and driver.is_alive():
        writing = [w for i, w in dict(run.running).items() if list(out.glob(f".{slides[i].stem}.*.partial"))]
        if writing:  # a worker with a slide half written: killed
            victim = writing[0]
            ray.kill(run.workers[victim].handle)
        time.sleep(0.05)
    driver.join(timeout=120)
    assert victim is not None, "no slide was seen running"
    assert [r.status for r in results] == ["done"] * len(slides)
    assert any(f"worker {victim} died while segmenting" in m for m in log)
    assert_same_outputs(out, reference, [s.stem for s in slides])
    recs = summary(out)["slides"]
    assert max(r["attempts"] for r in recs) == 2  # a retried slide, segmented once more
    assert all(r["worker"] != victim for r in recs)  # finished elsewhere


DRIVER = """
import sys
import ray
from tiny_models import register
from fastgicn.config import TileConfig
from fastgicn.distributed import ClusterRun
from fastgicn.models import create_model
import torch

torch.manual_seed(0)
address, out, *slides = sys.argv[1:]
ray.init(address=address, log_to_driver=False)
config = TileConfig(tile_size=128, overlap=16, level=0, batch_size=4)
env = {env!r}
ClusterRun(slides, out, create_model(register({name!r})), config, workers=1, runtime_env=env,
           log=lambda m: print(m, flush=True), progress=False).run()
"""


def test_resume_after_the_driver_is_killed(tmp_path, cluster, slides, reference, model):
    out = tmp_path / "out"
    script = tmp_path / "driver.py"
    script.write_text(DRIVER.format(env=SLOW_ENV, name=TINY))
    env = {**os.environ, "PYTHONPATH": PYTHONPATH}
    logfile = tmp_path / "driver.log"
    with open(logfile, "w") as fh:
        proc = subprocess.Popen([sys.executable, str(script), cluster.address_info["address"], str(out),
                                 *map(str, slides)], stdout=fh, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and proc.poll() is None and not list(out.glob("*.report.json")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    text = logfile.read_text()
    # the killed driver's worker goes with it (Ray ends the actors of a dead owner)
    pids = [int(w.split("pid ")[1].split(",")[0]) for w in text.splitlines() if "ready on" in w]
    assert pids, text
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.1)
    assert not any(_alive(p) for p in pids)
    finished = sorted(p.name for p in out.glob("*.report.json"))
    assert 1 <= len(finished) < len(slides), text
    results = ClusterRun(slides, out, model, CONFIG, workers=1, log=lambda m: None, progress=False).run()
    statuses = [r.status for r in results]
    assert statuses.count("skipped") == len(finished)
    assert statuses.count("done") == len(slides) - len(finished)
    assert_same_outputs(out, reference, [s.stem for s in slides])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").exists() and Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def test_the_plain_path_never_imports_ray(tmp_path, slides):
    code = ("import sys, fastgicn, torch\n"
            "from tiny_models import register\n"
            "from fastgicn import segment_slides\n"
            "from fastgicn.config import TileConfig\n"
            "from fastgicn.models import create_model\n"
            f"r = segment_slides([{str(slides[0])!r}], {str(tmp_path / 'out')!r},\n"
            "                   create_model(register('x')),\n"
            "                   TileConfig(tile_size=128, overlap=16, level=0, batch_size=4),\n"
            "                   progress=False)\n"
            "assert r[0].status == 'done', r\n"
            "print('ray' in sys.modules, any(m.startswith('fastgicn.distributed') for m in sys.modules))\n")
    env = {**os.environ, "PYTHONPATH": PYTHONPATH}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         check=True).stdout
    assert out.split() == ["False", "False"]


def test_cluster_progress_line():
    buf = io.StringIO()
    bar = ClusterProgress(4, "slides", enabled=True, stream=buf, interval=0)
    bar.update(finished=1, done=1, failed=0, running=2, tiles=30)
    bar.update(finished=2, done=1, failed=1, running=1, tiles=50)
    bar.close()
    last = buf.getvalue().splitlines()[-1]
    assert "2/4 slides" in last and "done 1, failed 1, running 1" in last
    assert "tiles/s" in last and "ETA" in last
    silent = io.StringIO()
    ClusterProgress(4, stream=silent).update(1, 1, 0, 0, 10)  # not a terminal: silent by default
    assert silent.getvalue() == ""
