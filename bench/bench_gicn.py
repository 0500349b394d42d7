"""Benchmark the Triton GICN against the reference module (four cuDNN convolutions and an add).

Shapes are the paper's (Res-2..5 at a 512 x 512 input: 256 x 128^2, 512 / 1024 / 2048 x 64^2, 32 outputs, k=7),
batch 1..32, channels-last and NCHW, fp16 and fp32 (bf16 on request). Medians by triton.testing.do_bench; each
case first checks the two outputs agree. cuDNN runs with benchmark=True (its best algorithm) and, for fp32, with
PyTorch's default TF32 setting, which the kernel follows. The goal (issue 4): >= 1.3x at Res-4 and Res-5.

    python bench/bench_gicn.py                                  # writes bench/results/gicn_<gpu>.json
    python bench/bench_gicn.py --stage res5 --batch 1 --dtype float16 --sweep   # also time other tile configs
    python bench/bench_gicn.py --dry-run                        # list the cases; needs no GPU
    python bench/bench_gicn.py --smoke --out -                  # every code path on tiny shapes, any machine

Needs a CUDA GPU (exits with status 2 and a message otherwise, except for --dry-run and --smoke).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
STAGES = {"res2": (256, 128), "res3": (512, 64), "res4": (1024, 64), "res5": (2048, 64)}


def environment() -> dict:
    """GPU / CPU names and library versions, recorded with every result."""
    import torch

    env = {"python": platform.python_version(), "platform": platform.platform(), "cpu": platform.processor()
           or platform.machine(), "torch": torch.__version__}
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    try:
        import fastgicn
        env["fastgicn"] = fastgicn.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        env.update(gpu=props.name, capability=f"{props.major}.{props.minor}", sm_count=props.multi_processor_count,
                   gpu_memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda,
                   cudnn=torch.backends.cudnn.version())
    return env


def default_out(op: str) -> Path:
    import torch

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "nogpu"
    return RESULTS / f"{op}_{re.sub(r'[^A-Za-z0-9]+', '-', gpu).strip('-').lower()}.json"


def write_results(path: str, payload: dict) -> None:
    text = json.dumps(payload, indent=2)
    if path == "-":
        print(text)
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(text + "\n")
    print(f"wrote {path}")


def no_gpu_message(script: str) -> str:
    return (f"{script}: no CUDA GPU visible to PyTorch; these benchmarks time GPU kernels and cannot run here. "
            f"Run it on a GPU machine, or pass --dry-run to list the cases.")


def timer(args):
    """ms per call: do_bench's median on a GPU; in --smoke mode (which may run on CPU) a plain median."""
    import triton

    if not args.smoke:
        return lambda fn: triton.testing.do_bench(fn, warmup=args.warmup, rep=args.rep, return_mode="median")

    def median_ms(fn, repeats=3):
        samples = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(samples)
    return median_ms


def smoke_device() -> str:
    """--smoke runs tiny shapes wherever it can: the GPU, else the Triton interpreter on CPU."""
    import torch

    if torch.cuda.is_available():
        return "cuda"
    os.environ.setdefault("TRITON_INTERPRET", "1")   # before fastgicn.kernels is imported
    return "cpu"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stage", nargs="+", choices=tuple(STAGES), default=list(STAGES))
    p.add_argument("--batch", nargs="+", type=int, default=[1, 8, 32])
    p.add_argument("--dtype", nargs="+", choices=("float16", "float32", "bfloat16"), default=["float16", "float32"])
    p.add_argument("--layout", nargs="+", choices=("channels_last", "nchw"), default=["channels_last", "nchw"])
    p.add_argument("--k", type=int, default=7)
    p.add_argument("--warmup", type=int, default=25, help="do_bench warm-up time, ms")
    p.add_argument("--rep", type=int, default=100, help="do_bench measuring time, ms")
    p.add_argument("--sweep", action="store_true", help="also time a grid of GicnConfigs and report the best")
    p.add_argument("--out", default=None, help="JSON path ('-' for stdout); default bench/results/gicn_<gpu>.json")
    p.add_argument("--dry-run", action="store_true", help="list the cases and the environment, run nothing")
    p.add_argument("--smoke", action="store_true",
                   help="run every code path on tiny shapes (CPU interpreter without a GPU); timings meaningless")
    args = p.parse_args(argv)
    if any(b < 1 for b in args.batch):
        p.error("--batch values must be >= 1")
    return args


def cases(args) -> list[dict]:
    stages = {s: (6, 13) for s in STAGES} if args.smoke else STAGES
    return [dict(stage=s, batch=b, dtype=d, layout=lay, c_in=stages[s][0], side=stages[s][1], k=args.k)
            for s in args.stage for b in args.batch for d in args.dtype for lay in args.layout]


SWEEP = [dict(block_h=bh, block_w=bw, block_k=bk, num_warps=nw, num_stages=ns)
         for bh, bw in ((4, 16), (8, 16), (8, 8), (16, 16)) for bk in (32, 64) for nw in (4, 8) for ns in (1, 2, 3)]


def run_case(case: dict, args, device: str = "cuda") -> dict:
    import torch

    from fastgicn.kernels import GicnConfig, gicn_forward
    from fastgicn.kernels.gicn import default_config
    from fastgicn.models.gicn import GICN

    dtype = getattr(torch, case["dtype"])
    torch.manual_seed(0)
    ref = GICN(case["c_in"], 32, case["k"]).to(device, dtype).eval()
    x = torch.randn(case["batch"], case["c_in"], case["side"], case["side"], device=device, dtype=dtype)
    if case["layout"] == "channels_last":
        x = x.to(memory_format=torch.channels_last)
        ref = ref.to(memory_format=torch.channels_last)
    with torch.inference_mode():
        y_ref = ref(x)
        y = gicn_forward(x, ref)
        err = ((y.float() - y_ref.float()).abs().max() / y_ref.float().abs().max()).item()
        bench = timer(args)
        t_ref = bench(lambda: ref(x))
        t_tri = bench(lambda: gicn_forward(x, ref))
        row = dict(case, reference_ms=t_ref, triton_ms=t_tri, speedup=t_ref / t_tri, max_rel_err=err,
                   config=dataclasses.asdict(default_config(x, 32, case["k"])))
        if args.sweep:
            best = None
            for cfg in SWEEP[:2] if args.smoke else SWEEP:
                c = GicnConfig(**cfg)
                try:
                    t = bench(lambda: gicn_forward(x, ref, c))
                except Exception as e:  # out of shared memory / registers for this config: skip it
                    print(f"  config {cfg}: {type(e).__name__}", file=sys.stderr)
                    continue
                if best is None or t < best[0]:
                    best = (t, cfg)
            if best is not None:
                row.update(best_config=best[1], best_config_ms=best[0], best_speedup=t_ref / best[0])
    return row


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    planned = cases(args)
    if args.dry_run:
        print(json.dumps(dict(op="gicn", environment=environment(), cases=planned), indent=2))
        return 0
    if args.smoke:
        device = smoke_device()
    elif torch.cuda.is_available():
        device = "cuda"
    else:
        print(no_gpu_message("bench_gicn"), file=sys.stderr)
        return 2
    torch.backends.cudnn.benchmark = True
    rows = []
    for case in planned:
        row = run_case(case, args, device)
        rows.append(row)
        print(f"{case['stage']} b{case['batch']:<3} {case['dtype']:<8} {case['layout']:<13} "
              f"cudnn {row['reference_ms']:.4f} ms  triton {row['triton_ms']:.4f} ms  x{row['speedup']:.2f}  "
              f"err {row['max_rel_err']:.1e}" + (f"  best x{row['best_speedup']:.2f}" if "best_speedup" in row
                                                  else ""), flush=True)
    write_results(args.out or str(default_out("gicn")),
                  dict(op="gicn", command=" ".join([sys.executable] + sys.argv), environment=environment(),
                       smoke=args.smoke, device=device,
                       timing="perf_counter median, ms (smoke)" if args.smoke else "triton.testing.do_bench median, ms", cudnn_benchmark=True,
                       cudnn_allow_tf32=torch.backends.cudnn.allow_tf32, results=rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
