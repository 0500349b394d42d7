"""python -m fastgicn.bench end to end on a tiny model (valid JSON, every section), and its pure parts."""
import json

import pytest
import torch

from fastgicn import bench


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_bench_runs_end_to_end_and_writes_valid_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = bench.main(["--width", "0.0625", "--size", "64", "--iters", "3", "--batch", "1,2",
                     "--backend", "onnxruntime", "--precision", "fp32", "--slide-size", "256",
                     "--device", "cpu", "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "CPU RUN" in text and "onnxruntime" in text and f"wrote {out}" in text
    result = json.loads(out.read_text())
    assert result["format"] == bench.FORMAT and result["machine"]["is_cpu_run"]
    assert result["command"].startswith("python -m fastgicn.bench --width 0.0625")
    assert result["machine"]["versions"]["torch"] and result["model"]["gflop_per_patch"] > 0
    rows = {r["backend"]: r for r in result["results"]}
    assert set(rows) == {"onnxruntime"}
    for r in rows.values():
        assert r["status"] == "ok"
        lat = r["latency_ms"]
        assert 0 < lat["p50"] <= lat["p95"] <= lat["p99"] and lat["n"] == 3
        assert [t["batch"] for t in r["throughput"]] == [1, 2]
        assert r["patches_per_s"] == max(t["patches_per_s"] for t in r["throughput"])
        assert r["tflops"] > 0 and r["fraction_of_peak"] is None and r["peak_tflops"] is None  # CPU: unknown
        assert r["rel_err_vs_torch_fp32"] < 1e-4 and r["host_peak_rss_mb"] > 0
    s = result["streaming"]
    # regions are bands of whole tile rows since TileStream runs on the pipeline's stitcher: one per row here
    assert s["tiles"] == 16 and 1 <= s["regions"] <= 16 and s["tiles_per_s"] > 0 and s["ratio_to_model_only"] > 0
    e = result["end_to_end"]
    assert e["available"], e  # the pipeline is installed here: a failing segment_slide must fail this test
    assert e["tiles_read"] >= 1 and e["tiles_per_s"] > 0 and e["ratio_to_model_only"] > 0
    assert "forward" in e["seconds_per_stage"]
    assert result["goals"]["applies"] is False and "CPU" in result["goals"]["why_not"]
    h = result["host_ceiling"]  # the whole flow with a zero-cost model against raw decode (issue 9)
    assert "host ceiling (aperio layout" in text and "raw decode" in text
    assert "layouts" in h, h
    for layout in ("aperio", "pow2"):
        r = h["layouts"][layout]
        assert r["available"], r
        assert r["candidate_tiles"] >= 1 and r["decode_tiles_per_s"] > 0 and r["flow_tiles_per_s"] > 0
        assert r["ratio"] == pytest.approx(r["flow_tiles_per_s"] / r["decode_tiles_per_s"], rel=1e-6) \
            or r["repeats"] > 1
        assert r["seconds_per_stage_median"]["total"] > 0 and r["model"] == "zero_cost"
    assert h["layouts"]["aperio"]["read"]["reduction"] == 2  # 0.5 um/px from a 1/4/16 pyramid: reduced 2x


def test_zero_cost_model_returns_constant_logits_at_the_input_resolution():
    m = bench.ZeroCostModel()
    assert m.mean.shape == (3,) and m.std.shape == (3,) and {"mean", "std"} <= dict(m.named_buffers()).keys()
    y = m(torch.zeros(3, 3, 40, 24))
    assert y.shape == (3, 2, 40, 24) and bool((y[:, 0] > y[:, 1]).all())


def test_bench_read_quick_writes_sane_json(tmp_path):
    """bench/bench_read.py --quick: runs in seconds and writes its JSON (no timed assertions)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "read.json"
    proc = subprocess.run([sys.executable, str(root / "bench" / "bench_read.py"), "--quick", "--json", str(out),
                           "--tmp", str(tmp_path)], capture_output=True, text=True, timeout=300, cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["format"] == "fastgicn-bench-read-1" and r["command"].startswith("python bench/bench_read.py --quick")
    assert r["machine"]["cores_usable"] >= 1 and r["machine"]["cpu"]
    assert all(r["versions"][k] for k in ("openslide", "imagecodecs", "tifffile", "numpy"))
    assert len(r["load_average"]["start"]) == 3 and len(r["load_average"]["rounds"]) == 1
    assert r["identity"]["all_identical"] is True  # the readers' pixels agree at level 0 and reduced
    for s in ("jpeg_svs", "j2k_svs", "deflate_tiff"):
        med = r["results"][s]["tiles_per_s_median"]
        assert set(med) == {"direct", "openslide", "openslide-python"}
        assert all(v > 0 for by_t in med.values() for v in by_t.values())
        assert r["results"][s]["direct_over"]["openslide"]["1"] > 0
        assert r["results"][s]["scaling_2_over_1"]["direct"] > 0
    assert r["results"]["resampled"]["tiles_per_s_median"]["direct"]["1"] > 0
    assert r["resampled"]["resolution"]["reduction"] == 2 and r["resampled"]["resolution"]["level"] == 0


def test_unavailable_backends_are_reported_not_fatal(tmp_path, capsys):
    from fastgicn.cli import main  # `fastgicn bench ...` passes everything through

    rc = main(["bench", "--width", "0.0625", "--size", "64", "--iters", "2", "--batch", "1",
               "--backend", "tensorrt,torch", "--device", "cpu", "--no-e2e", "--json", str(tmp_path / "b.json")])
    assert rc == 0
    out = capsys.readouterr().out
    assert "tensorrt" in out and "unavailable" in out and "pip install" in out
    rows = {r["backend"]: r for r in json.loads((tmp_path / "b.json").read_text())["results"]}
    assert rows["tensorrt"]["status"] == "unavailable" and "pip install" in rows["tensorrt"]["reason"]
    assert rows["torch"]["status"] == "ok" and rows["torch"]["rel_err_vs_torch_fp32"] < 1e-6


def test_bad_flags_exit_with_status_2(capsys):
    assert bench.main(["--backend", "tflite", "--device", "cpu"]) == 2
    assert "unknown ['tflite']" in capsys.readouterr().err
    assert bench.main(["--batch", "1,x", "--device", "cpu"]) == 2


@pytest.mark.parametrize("name,precision,peak", [
    ("NVIDIA H100 80GB HBM3", "fp16", 989.4), ("NVIDIA H100 PCIe", "bf16", 756.5), ("NVIDIA H100 NVL", "fp16", 835.5),
    ("NVIDIA H200", "fp32", 494.7), ("NVIDIA H200 NVL", "fp16", 835.5), ("NVIDIA A100-SXM4-80GB", "fp16", 312.0),
    ("NVIDIA GeForce RTX 4090", "fp16", None), (None, "fp16", None),
])
def test_peak_table(name, precision, peak):
    assert bench.peak_tflops(name, precision) == peak


def test_goals_are_judged_only_on_an_h100_with_the_full_model():
    def result(device_name, width=1.0, tile=512):
        return {"machine": {"device_name": device_name}, "model": {"kwargs": {"width": width}, "tile": tile},
                "results": [{"backend": "compiled", "precision": "fp16", "status": "ok", "patches_per_s": 1600.0,
                             "latency_ms": {"p50": 3.5}, "speedup_over_compile_default": 1.4},
                            {"backend": "torch.compile(default)", "precision": "fp16", "status": "ok",
                             "patches_per_s": 1100.0, "latency_ms": {"p50": 2.0}}],
                "end_to_end": {"ratio_to_model_only": 0.8}}

    g = bench.goals(result("NVIDIA H100 80GB HBM3"), torch.device("cuda"))
    assert g["applies"] and g["patches_per_s"]["met"] and not g["latency_p50_ms"]["met"]
    assert g["compiled_over_default"]["met"] and not g["end_to_end_ratio"]["met"]
    assert not bench.goals(result("NVIDIA H100 80GB HBM3", width=0.5), torch.device("cuda"))["applies"]
    assert not bench.goals(result("NVIDIA A100-SXM4-80GB"), torch.device("cuda"))["applies"]


def test_percentiles():
    p = bench.percentiles([float(v) for v in range(1, 101)])
    assert p["p50"] == pytest.approx(50.5) and p["p99"] == pytest.approx(99.01) and p["n"] == 100
