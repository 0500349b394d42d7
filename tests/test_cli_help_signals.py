"""`fastgicn segment --help` documents every option, its default and the output files; SIGTERM behaves like
Ctrl-C (partial outputs removed, one line, exit status 143) in a real subprocess."""
import argparse
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import torch

from fastgicn.cli import build_parser
from fastgicn.demo import DEMO_SIZE, DEMO_WEIGHTS
from fastgicn.naming import OUTPUT_SUFFIXES
from fastgicn.synth import write_synthetic_slide


def _segment_parser() -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["segment"]


def test_segment_help_documents_every_option_and_the_output_files():
    parser = _segment_parser()
    undocumented = [a.dest for a in parser._actions if not a.help or a.help == argparse.SUPPRESS]
    assert undocumented == []
    text = parser.format_help()
    for suffix in OUTPUT_SUFFIXES.values():
        assert f"NAME{suffix}" in text
    for action in parser._actions:  # an option with a non-trivial default says it
        if action.option_strings and action.default not in (None, False, argparse.SUPPRESS) \
                and action.dest != "help":
            d = action.default
            shown = {f"{d[0]}x{d[1]}"} if isinstance(d, tuple) else {str(d), f"{d:g}" if isinstance(d, float) else d}
            assert any(f"default: {v}" in action.help for v in shown), action.dest
    assert "143 SIGTERM" in text and "130 Ctrl-C" in text


def test_segment_help_defaults_are_the_demo_weights_and_demo_slide():
    help_of = {a.dest: a.help for a in _segment_parser()._actions}
    assert f"default: {DEMO_SIZE[0]}x{DEMO_SIZE[1]}" in help_of["demo_size"]
    assert DEMO_WEIGHTS.is_file(), f"the shipped demo weights are missing at {DEMO_WEIGHTS}"
    tile = torch.load(DEMO_WEIGHTS, map_location="cpu", weights_only=True)["tile_config"]
    for dest in ("tile_size", "overlap", "batch_size", "target_mpp", "min_tissue_fraction", "white_threshold"):
        assert f"demo weights: {tile[dest]}" in help_of[dest], dest


def test_help_runs_as_a_command():
    out = subprocess.run([sys.executable, "-m", "fastgicn.cli", "segment", "--help"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and ".tumour_mask.tif" in out.stdout and "--no-progress" in out.stdout


# ---------------------------------------------------------------------------------------------------
# SIGTERM in the middle of a slide

SCRIPT = textwrap.dedent("""
    from fastgicn.config import TileConfig
    from tiny_models import main_with_checkpoint

    main_with_checkpoint("sigterm_test_slow", TileConfig(tile_size=64, overlap=0, level=0, batch_size=2))
""")



def test_sigterm_mid_slide_removes_partials_says_one_line_and_the_rerun_completes(tmp_path):
    script = tmp_path / "run_fastgicn.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([os.path.dirname(os.path.abspath(__file__)), os.environ.get("PYTHONPATH", "")])}
    ckpt = tmp_path / "slow.pt"
    subprocess.run([sys.executable, str(script), "make", str(ckpt)], check=True, env=env, timeout=120)
    done, _ = write_synthetic_slide(tmp_path / "first.svs", 256, 256, seed=1)
    slide, _ = write_synthetic_slide(tmp_path / "second.svs", 1024, 1024, seed=2)
    out = tmp_path / "out"
    argv = [sys.executable, str(script), "segment", str(done), str(slide), "-o", str(out), "--weights",
            str(ckpt), "--torch-threads", "1", "--threads", "1", "--min-tissue-fraction", "0",
            "--no-tissue-prefilter", "--no-progress"]
    first = [a for a in argv if a != str(slide)]
    subprocess.run(first, check=True, env=env, timeout=120, capture_output=True)  # the first slide is finished
    started = tmp_path / "started"
    proc = subprocess.Popen(argv, env={**env, "FASTGICN_TEST_STARTED": str(started)}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not started.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the run never reached the network"
            time.sleep(0.05)
        time.sleep(1.0)  # a few batches in: the TIFF writers hold partial files now
        partial_before = [p.name for p in out.iterdir() if p.name.startswith(".")]
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert partial_before, "SIGTERM came too late to test anything: no partial file was being written"
    assert proc.returncode == 128 + signal.SIGTERM, (proc.returncode, stderr)
    lines = stderr.strip().splitlines()
    assert lines[-1] == ("fastgicn segment: terminated (SIGTERM): partial outputs removed, finished slides "
                         "kept; run the same command to resume")
    assert "Traceback" not in stderr
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []
    assert not (out / "second.report.json").exists()
    assert json.loads((out / "first.report.json").read_text())["complete"]  # the finished slide is kept
    again = subprocess.run(argv, env=env, timeout=120, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert "first.svs: outputs complete" in again.stderr
    assert json.loads((out / "second.report.json").read_text())["complete"]
