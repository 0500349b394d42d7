"""The command line of `python -m fastgicn.bench`: flags, the defaults of this device, the run that fills the
results JSON, and main (the table, the JSON file, exit status 2 on a user's error)."""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

import torch

from ..errors import ConfigError, FastGicnError
from .backends import _release, bench_backend, bench_end_to_end, bench_streaming
from .host import _load_average, bench_host_ceiling
from .measure import machine_info
from .report import format_table, goals

FORMAT = "fastgicn-bench-1"
DESCRIPTION = ("`python -m fastgicn.bench`: how fast each engine backend runs the model here, and how close "
               "to the device's peak.")


# -- the run -------------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m fastgicn.bench", description=DESCRIPTION)
    p.add_argument("--model", default="resnet50_gicn_gpp", help="registered model name")
    p.add_argument("--width", type=float, default=None,
                   help="channel multiplier (default 1.0 on GPU, 0.125 on CPU)")
    p.add_argument("--k", type=int, default=7, help="GICN kernel size")
    p.add_argument("--checkpoint", type=Path, default=None, help="bench a trained checkpoint instead")
    p.add_argument("--size", type=int, default=None, help="tile side (default 512 on GPU, 256 on CPU)")
    p.add_argument("--batch", type=str, default=None,
                   help="comma-separated batch sizes for throughput (default 1,32,128 GPU; 1,2,4 CPU); each "
                        "is compiled / graphed / in the TensorRT profile")
    p.add_argument("--backend", type=str, default="default",
                   help="comma-separated backends, 'all', or 'default' (all on GPU; torch,onnxruntime on "
                        "CPU)")
    p.add_argument("--precision", type=str, default="auto",
                   help="comma-separated precisions (default fp16,bf16 on GPU, fp32 on CPU)")
    p.add_argument("--iters", type=int, default=None,
                   help="batch-1 latency samples (default 200 GPU, 20 CPU)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (torch.set_num_threads) and ONNX Runtime (default: theirs, "
                        "one per core; 1 when the load average already exceeds the cores: on shared cores "
                        "OpenMP stalls slowed eager torch 30x on a busy 2-core machine)")
    p.add_argument("--no-e2e", action="store_true",
                   help="skip the streaming, end-to-end and host-ceiling runs")
    p.add_argument("--no-host", action="store_true",
                   help="skip the host ceiling (the whole flow with a zero-cost model against raw decode)")
    p.add_argument("--reader-threads", type=int, default=None,
                   help="reader threads for the host ceiling (default: the usable cores, as segment_slide)")
    p.add_argument("--host-repeats", type=int, default=2, help="interleaved rounds of the host ceiling")
    p.add_argument("--slide-size", type=int, default=None,
                   help="synthetic slide side (default 2048 CPU, 16384 GPU)")
    p.add_argument("--json", type=Path, default=None, help="write the full results here")
    args = p.parse_args(argv)
    return args


def _fill_defaults(args, device: torch.device) -> None:
    gpu = device.type == "cuda"
    args.width = args.width if args.width is not None else (1.0 if gpu else 0.125)
    args.size = args.size or (512 if gpu else 256)
    args.iters = args.iters or (200 if gpu else 20)
    args.slide_size = args.slide_size or (16384 if gpu else 2048)
    try:
        args.batch = [int(b) for b in (args.batch or ("1,32,128" if gpu else "1,2,4")).split(",")]
    except ValueError:
        raise ConfigError(f"--batch {args.batch!r}: give comma-separated positive integers, "
                          "e.g. 1,8,32") from None
    if any(b < 1 for b in args.batch):
        raise ConfigError(f"--batch {args.batch}: batch sizes must be positive")
    from ..engine.engine import BACKENDS
    if args.backend == "default":
        args.backends = list(BACKENDS) if gpu else ["torch", "onnxruntime"]
    elif args.backend == "all":
        args.backends = list(BACKENDS)
    else:
        args.backends = [b.strip() for b in args.backend.split(",") if b.strip()]
        unknown = sorted(set(args.backends) - set(BACKENDS))
        if unknown:
            raise ConfigError(f"--backend: unknown {unknown}; use some of {', '.join(BACKENDS)}, "
                              "'all' or 'default'")
    args.precisions = (["fp16", "bf16"] if gpu else ["fp32"]) if args.precision == "auto" else \
        [p.strip() for p in args.precision.split(",")]
    from ..engine.base import PRECISIONS
    bad = sorted(set(args.precisions) - set(PRECISIONS))
    if bad:
        raise ConfigError(f"--precision: unknown {bad}; use some of {', '.join(PRECISIONS)}")


def run(args) -> dict:
    from ..engine.base import reference_copy, resolve_device
    from ..models import create_model
    from ..models.preprocess import to_model_input
    from ..models.summary import gmacs

    device = resolve_device(args.device)
    _fill_defaults(args, device)
    if args.threads is None and device.type == "cpu" and hasattr(os, "getloadavg") \
            and os.getloadavg()[0] > (os.cpu_count() or 1):
        # cores already busy: one thread per runtime, else torch's OpenMP threads stall (30x seen)
        args.threads = 1
        args.auto_threads_note = (f"load average {os.getloadavg()[0]:.1f} > {os.cpu_count()} cores at start: "
                                  "ran with 1 thread per runtime (--threads N overrides)")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.checkpoint:
        from ..checkpoint import model_from_checkpoint
        model = model_from_checkpoint(args.checkpoint, "cpu")
    else:
        kwargs = {"width": args.width} if args.model == "resnet50_gpp" else {"k": args.k, "width": args.width}
        torch.manual_seed(0)
        model = create_model(args.model, **kwargs).eval()
    with torch.device("meta"):
        meta_model = create_model(model.model_name, **model.model_kwargs).eval()
    macs = gmacs(meta_model, args.size)
    flops_per_patch = 2 * macs * 1e9
    # the fp32 torch reference on the same random tiles, for every backend's error
    g = torch.Generator().manual_seed(99)
    x_ref = torch.randint(0, 256, (2, args.size, args.size, 3), dtype=torch.uint8, generator=g)
    ref_model = reference_copy(model).to(device)
    with torch.inference_mode():
        ref_logits = ref_model(to_model_input(x_ref.to(device), model.mean, model.std)).float().cpu()
    del ref_model
    reference = {"x": x_ref, "logits": ref_logits}

    result = {"format": FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "command": "python -m fastgicn.bench " + " ".join(shlex.quote(a) for a in (args.argv or [])),
              "machine": machine_info(device),
              "model": {"name": model.model_name, "kwargs": model.model_kwargs, "tile": args.size,
                        "gmacs_per_patch": macs, "gflop_per_patch": 2 * macs,
                        "params_m": sum(p.numel() for p in model.parameters()) / 1e6},
              "config": {"backends": args.backends, "precisions": args.precisions, "batches": args.batch,
                         "iters": args.iters, "threads": args.threads or torch.get_num_threads()},
              "results": [], "notes": []}
    if device.type == "cpu":
        result["notes"].append(
            "CPU run: figures are for this CPU, not a GPU; device peak TFLOP/s is unknown on CPU. The GPU "
            "goals (1,500 patches/s, 3 ms, 90% end-to-end, 1.3x torch.compile) apply to one H100, full "
            "model, 512, fp16.")
        if args.backend == "default":
            result["notes"].append("compiled is left out by default on CPU: Inductor's C++ compile takes "
                                   "20-80 s per shape on a small CPU; pass --backend all or --backend "
                                   "compiled")
    if getattr(args, "auto_threads_note", None):
        result["notes"].append(args.auto_threads_note)
    rows = []
    best = None  # the fastest real backend so far, kept built for the streaming and end-to-end runs
    for name in args.backends:
        for precision in args.precisions:
            row = bench_backend(model, name, precision, device, args, flops_per_patch, reference)
            rows.append(row)
            if name == "compiled" and device.type == "cuda" and row["status"] == "ok":
                # torch.compile's default on the same model and precision: the baseline of the 1.3x goal
                base = bench_backend(model, "compiled", precision, device, args, flops_per_patch, reference,
                                     options={"compile_options": {}, "cuda_graphs": False, "triton": False,
                                              "channels_last": False},
                                     label="torch.compile(default)")
                rows.append(base)
                _release(base)
                row["speedup_over_compile_default"] = (row["patches_per_s"] / base["patches_per_s"]
                                                       if base["status"] == "ok" else None)
            if row["status"] == "ok" and (best is None or row["patches_per_s"] > best["patches_per_s"]):
                if best is not None:
                    _release(best)
                best = row
            elif row is not best:
                _release(row)
    result["results"] = [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]
    if best is not None and not args.no_e2e:
        engine = best["_engine"]
        model_pps = next(t["patches_per_s"] for t in best["throughput"] if t["batch"] == max(args.batch))
        result["streaming"] = {"backend": best["backend"], "precision": best["precision"],
                               **bench_streaming(engine, model_pps,
                                                 tiles_side=4 if device.type == "cpu" else 16,
                                                 overlap=args.size // 8)}
        e2e = bench_end_to_end(engine, model_pps, args.slide_size)
        result["end_to_end"] = {"backend": best["backend"], "precision": best["precision"],
                                "batch": max(args.batch), **e2e}
    if best is not None:
        _release(best)
    if not args.no_e2e and not args.no_host:
        from ..cpus import default_reader_threads

        threads = args.reader_threads or default_reader_threads()
        try:
            result["host_ceiling"] = {"reader_threads": threads, "load_average_before": _load_average(),
                                      **bench_host_ceiling(args.size, max(args.batch), args.slide_size,
                                                           threads, repeats=args.host_repeats)}
        except ImportError as exc:
            result["host_ceiling"] = {"available": False,
                                      "reason": f"the slide pipeline is not installed ({exc})"}
    result["goals"] = goals(result, device)
    return result



def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    threads = torch.get_num_threads()
    try:
        args = parse_args(argv)
        args.argv = argv
        result = run(args)
    except FastGicnError as exc:
        print(f"fastgicn bench: error: {exc}", file=sys.stderr)
        return 2
    finally:
        torch.set_num_threads(threads)  # --threads is for the run, not for a caller of main()
    print(format_table(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1, default=str) + "\n")
        print(f"wrote {args.json}")
    return 0

