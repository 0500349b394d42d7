"""`python -m fastgicn.bench`: how fast each engine backend runs the model here, and how close to the
device's peak.

For each available backend x precision:
  - latency per patch at batch 1 (p50 / p95 / p99 over `--iters` forwards, input already on the device);
  - throughput (patches/s) at each batch size of `--batch`, and the best of them;
  - achieved TFLOP/s (2 x MACs per patch from fastgicn.models.summary.gmacs) and the fraction of the device's
    dense peak for that precision (a datasheet table for H100 / H200 / A100; "unknown" on CPU);
  - peak device memory (torch allocator and, for TensorRT/ONNX Runtime, the driver's used-memory delta) and
    peak host RSS while that backend was built and run; build time (export / compile / engine build);
  - relative error of the logits against the fp32 torch reference on the same random tiles.
Then, with the fastest backend: streaming (`Engine.stream`) over an in-memory image and, when the slide
pipeline is installed, end to end on a synthetic slide with seconds per stage and the ratio end-to-end /
model-only throughput (1.0 means the pipeline keeps the device busy).

Then the host ceiling: the whole flow (`segment_slide`, every output) with a zero-cost model (constant logits)
on synthetic slides at 0.5 um/px (an Aperio 1/4/16 layout, read at level 0 reduced 2x, and a power-of-two
one), in tiles/s against the raw decode of the same tiles by the same number of reader threads in the same
run, and their ratio (issue 9's target: >= 0.5), with the report's seconds per stage (`--no-host` skips it).

Table on the terminal; `--json FILE` for machines. Defaults finish in about a minute on a small CPU (width
0.125, 256-pixel tiles, torch + onnxruntime) and run the paper's full model at 512 x 512 on a GPU.

The modules: measure.py (latency, throughput, device peaks and memory, the machine), backends.py (one backend
x precision; streaming and end to end), host.py (the host ceiling and the model-only ratio), report.py (the
goals and the table), cli.py (flags, the run, main); `python -m fastgicn.bench` runs cli.main.
"""
from __future__ import annotations

from .backends import bench_backend, bench_end_to_end, bench_streaming
from .cli import FORMAT, main, parse_args, run
from .host import (HOST_CEILING_GOAL, ZeroCostModel, bench_host_ceiling, decode_seconds, host_ceiling,
                   model_only_ratio, write_bench_slide)
from .host import _candidates, _load_average  # noqa: F401 (used by bench/bench_pipeline.py and others)
from .measure import (PEAK_TFLOPS, machine_info, measure_latency, measure_throughput, peak_tflops,
                      percentiles, row_device_name)
from .report import GOALS, format_host_ceiling, format_table, goals

__all__ = ["main", "run", "parse_args", "FORMAT", "GOALS", "PEAK_TFLOPS", "HOST_CEILING_GOAL", "peak_tflops",
           "percentiles", "measure_latency", "measure_throughput", "machine_info", "row_device_name",
           "bench_backend", "bench_streaming", "bench_end_to_end", "ZeroCostModel", "decode_seconds",
           "host_ceiling", "model_only_ratio", "write_bench_slide", "bench_host_ceiling", "goals",
           "format_table", "format_host_ceiling"]
