"""`python -m fastgicn.verify`: the table, the exit status, and the --save / --reference round trip.

Each check is also shown to fail: a kernel made slightly wrong, and a reference file whose outputs were altered.
"""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from fastgicn import kernels, verify


def test_kernel_table_passes_and_prints_every_row(capsys):
    rc = verify.main(["--no-model", "--dtype", "float32", "float16"])
    out = capsys.readouterr().out
    assert rc == 0, out
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("kernel"))
    for word in ("shape", "dtype", "layout", "max abs err", "max rel err", "tolerance", "result"):
        assert word in lines[header]
    rows = [line for line in lines[header + 2:] if line.startswith(("gicn", "gpp"))]
    assert len(rows) == len(verify.kernel_cases("cuda" if torch.cuda.is_available() else "cpu",
                                                ["float32", "float16"]))
    assert all(line.rstrip().endswith("PASS") for line in rows)
    assert any("channels_last" in r for r in rows) and any("float16" in r for r in rows)
    assert "0 failed" in out


def test_a_wrong_kernel_fails_the_table(monkeypatch, capsys):
    real = kernels.gicn_forward

    def off_by_a_little(x, module, config=None):
        y = real(x, module, config)
        return y + 1e-3 * y.abs().max()   # 1e-3 relative: well inside fp16 noise, 10x the fp32 tolerance

    monkeypatch.setattr(kernels, "gicn_forward", off_by_a_little)
    rc = verify.main(["--no-model", "--dtype", "float32"])
    out = capsys.readouterr().out
    assert rc == 1
    assert any(line.startswith("gicn") and "FAIL" in line for line in out.splitlines())
    assert any(line.startswith("gpp") and line.rstrip().endswith("PASS") for line in out.splitlines())


def test_save_then_reference_round_trip(tmp_path, capsys):
    path = tmp_path / "ref.npz"
    assert verify.main(["--save", str(path), "--width", "0.125", "--size", "64", "--batch", "1"]) == 0
    data = np.load(path)
    meta = json.loads(str(data["meta"]))
    assert meta["model_name"] == "resnet50_gicn_gpp" and meta["model_kwargs"] == {"k": 7, "width": 0.125}
    assert data["input"].shape == (1, 3, 64, 64) and data["output"].shape == (1, 2, 64, 64)
    assert any(k.startswith("param/decoder.gicn1.a_row") for k in data.files)   # weights travel with it
    capsys.readouterr()

    rc = verify.main(["--reference", str(path), "--dtype", "float32"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "model[torch] vs file" in out and "model[triton] vs file" in out

    # the same file with outputs off by 1% must fail, and say so
    arrays = {k: data[k] for k in data.files}
    arrays["output"] = arrays["output"] * 1.01
    bad = tmp_path / "bad.npz"
    np.savez(bad, **arrays)
    rc = verify.main(["--reference", str(bad), "--dtype", "float32", "--backend", "torch"])
    out = capsys.readouterr().out
    assert rc == 1 and "FAIL" in out


def test_reference_weights_are_used_not_regenerated(tmp_path, capsys):
    """Changing the stored weights changes what the check computes: the file is self-contained."""
    path = tmp_path / "ref.npz"
    assert verify.main(["--save", str(path), "--width", "0.125", "--size", "48", "--batch", "1"]) == 0
    data = np.load(path)
    arrays = {k: data[k] for k in data.files}
    arrays["param/head.bias"] = arrays["param/head.bias"] + 1.0
    moved = tmp_path / "moved.npz"
    np.savez(moved, **arrays)
    capsys.readouterr()
    assert verify.main(["--reference", str(moved), "--dtype", "float32", "--backend", "torch"]) == 1


def test_unusable_reference_files_exit_2(tmp_path, capsys):
    assert verify.main(["--reference", str(tmp_path / "missing.npz")]) == 2
    assert "does not exist" in capsys.readouterr().err
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not an npz")
    assert verify.main(["--reference", str(junk)]) == 2
    assert "not a fastgicn.verify --save file" in capsys.readouterr().err


def test_bad_arguments_exit_2(capsys):
    assert verify.main(["--no-kernels", "--no-model"]) == 2
    if not torch.cuda.is_available():
        assert verify.main(["--dtype", "bfloat16"]) == 2
        assert "bfloat16" in capsys.readouterr().err


def test_command_line_exit_status(tmp_path):
    """The module entry point itself turns the result into the process exit status."""
    r = subprocess.run([sys.executable, "-m", "fastgicn.verify", "--reference", str(tmp_path / "none.npz")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "does not exist" in r.stderr


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_paper_shapes_on_gpu(capsys):
    rc = verify.main(["--no-model"])
    assert rc == 0, capsys.readouterr().out
