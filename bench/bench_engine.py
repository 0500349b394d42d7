"""Interleaved A/B timing of engine backends: fair rankings on a machine whose cores are shared.

`python -m fastgicn.bench` times one backend after another, so a neighbour's job that starts halfway skews the
comparison. Here every round runs each backend once per batch size, in turn, on the same inputs, and the
medians over rounds are compared: load drift hits all backends alike. This is what `auto`'s CPU order rests on.

    python bench/bench_engine.py --backends torch,onnxruntime --width 0.125 --size 256 --rounds 15 \
        --json bench/results/engine_cpu_interleaved.json
"""
from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from fastgicn.bench import machine_info
from fastgicn.engine import Engine
from fastgicn.engine.base import resolve_device
from fastgicn.models import create_model


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backends", default="torch,onnxruntime")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--model", default="resnet50_gicn_gpp")
    p.add_argument("--width", type=float, default=0.125)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--batches", default="1,4")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=None, help="torch and ONNX Runtime CPU threads")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    torch.manual_seed(0)
    model = create_model(args.model, width=args.width).eval()
    engines = {}
    for name in args.backends.split(","):
        t0 = time.perf_counter()
        options = {"threads": args.threads} if name == "onnxruntime" and args.threads else {}
        engines[name] = Engine(model, backend=name, precision=args.precision, device=device,
                               batch_size=max(batches), tile_size=args.size, verify=True, **options)
        print(f"built {name} in {time.perf_counter() - t0:.1f} s: {engines[name].backend.description}")
    g = torch.Generator().manual_seed(1)
    inputs = {b: torch.randint(0, 256, (b, args.size, args.size, 3), dtype=torch.uint8, generator=g).to(device)
              for b in batches}
    samples = {(n, b): [] for n in engines for b in batches}
    load_before = machine_info(device)["load_average"]
    with torch.inference_mode():
        for n, e in engines.items():  # warm-up
            for b in batches:
                e.backend.forward(inputs[b])
        for _ in range(args.rounds):
            for b in batches:
                for n, e in engines.items():
                    t0 = time.perf_counter()
                    e.backend.forward(inputs[b])
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    samples[(n, b)].append((time.perf_counter() - t0) * 1e3 / b)
    rows = []
    for (n, b), v in samples.items():
        rows.append({"backend": n, "batch": b, "median_ms_per_patch": statistics.median(v),
                     "min_ms_per_patch": min(v), "max_ms_per_patch": max(v), "rounds": len(v)})
    base = {r["batch"]: r["median_ms_per_patch"] for r in rows if r["backend"] == "torch"}
    for r in rows:
        if r["batch"] in base:
            r["speedup_over_torch_median"] = base[r["batch"]] / r["median_ms_per_patch"]
    print(f"{'backend':<14}{'batch':>6}{'median ms/patch':>17}{'min':>9}{'max':>9}{'x torch':>9}")
    for r in rows:
        print(f"{r['backend']:<14}{r['batch']:>6}{r['median_ms_per_patch']:>17.1f}{r['min_ms_per_patch']:>9.1f}"
              f"{r['max_ms_per_patch']:>9.1f}{r.get('speedup_over_torch_median', float('nan')):>9.2f}")
    if args.json:
        info = machine_info(device)
        result = {"format": "fastgicn-bench-interleaved-1",
                  "command": "python bench/bench_engine.py " + " ".join(shlex.quote(a) for a in argv),
                  "machine": info, "load_average_before": load_before,
                  "note": ("CPU run" if device.type == "cpu" else "GPU run") + ": each round runs every backend "
                          "once per batch size in turn on the same inputs; medians over rounds",
                  "model": {"name": args.model, "width": args.width, "tile": args.size},
                  "precision": args.precision, "threads": args.threads or torch.get_num_threads(),
                  "results": rows}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
