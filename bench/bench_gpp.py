"""Benchmark the Triton GPP against the reference module (4 avg-pools, 1x1 conv + BN + ReLU, upsample, cat).

Shape is the paper's Res-5 (2048 x 64 x 64, 512 channels a branch, output 4096 channels), batch 1..32,
channels-last and NCHW, fp16 and fp32 (bf16 on request). Two Triton timings: `triton` allocates the concat and
copies Res-5 into it (a drop-in for the module), `triton_inplace` gets a buffer whose first 2048 channels already
hold Res-5 (what a producer writing Res-5 into `gpp_output_buffer` gets). Medians by triton.testing.do_bench;
each case first checks the outputs agree. The goal (issue 4): >= 2x.

    python bench/bench_gpp.py                     # writes bench/results/gpp_<gpu>.json
    python bench/bench_gpp.py --dry-run           # list the cases; needs no GPU
    python bench/bench_gpp.py --smoke --out -     # every code path on tiny shapes, any machine

Needs a CUDA GPU (exits with status 2 and a message otherwise, except for --dry-run and --smoke).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gicn import default_out, environment, no_gpu_message, smoke_device, timer, write_results  # noqa: E402,E501


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", nargs="+", type=int, default=[1, 8, 32])
    p.add_argument("--channels", type=int, default=2048, help="Res-5 channels")
    p.add_argument("--side", type=int, default=64, help="Res-5 side")
    p.add_argument("--branch-channels", type=int, default=512)
    p.add_argument("--dtype", nargs="+", choices=("float16", "float32", "bfloat16"), default=["float16", "float32"])
    p.add_argument("--layout", nargs="+", choices=("channels_last", "nchw"), default=["channels_last", "nchw"])
    p.add_argument("--warmup", type=int, default=25, help="do_bench warm-up time, ms")
    p.add_argument("--rep", type=int, default=100, help="do_bench measuring time, ms")
    p.add_argument("--out", default=None, help="JSON path ('-' for stdout); default bench/results/gpp_<gpu>.json")
    p.add_argument("--dry-run", action="store_true", help="list the cases and the environment, run nothing")
    p.add_argument("--smoke", action="store_true",
                   help="run every code path on tiny shapes (CPU interpreter without a GPU); timings meaningless")
    args = p.parse_args(argv)
    if args.smoke:
        args.channels, args.side, args.branch_channels = 6, 13, 8
    if any(b < 1 for b in args.batch) or args.side < 6:
        p.error("--batch must be >= 1 and --side >= 6")
    return args


def cases(args) -> list[dict]:
    return [dict(batch=b, dtype=d, layout=lay, c_in=args.channels, side=args.side, c_out=args.branch_channels)
            for b in args.batch for d in args.dtype for lay in args.layout]


def run_case(case: dict, args, device: str = "cuda") -> dict:
    import torch

    from fastgicn.kernels import gpp_forward, gpp_output_buffer
    from fastgicn.models.gpp import GPP

    dtype = getattr(torch, case["dtype"])
    torch.manual_seed(0)
    ref = GPP(case["c_in"], case["c_out"]).to(device, dtype).eval()
    x = torch.randn(case["batch"], case["c_in"], case["side"], case["side"], device=device, dtype=dtype)
    if case["layout"] == "channels_last":
        x = x.to(memory_format=torch.channels_last)
        ref = ref.to(memory_format=torch.channels_last)
    out, res5 = gpp_output_buffer(x, ref)
    res5.copy_(x)
    with torch.inference_mode():
        y_ref = ref(x)
        y = gpp_forward(x, ref)
        y2 = gpp_forward(res5, ref, out=out)
        scale = y_ref.float().abs().max()
        err = max(((y.float() - y_ref.float()).abs().max() / scale).item(),
                  ((y2.float() - y_ref.float()).abs().max() / scale).item())
        bench = timer(args)
        t_ref = bench(lambda: ref(x))
        t_tri = bench(lambda: gpp_forward(x, ref))
        t_inp = bench(lambda: gpp_forward(res5, ref, out=out))
    return dict(case, reference_ms=t_ref, triton_ms=t_tri, triton_inplace_ms=t_inp, speedup=t_ref / t_tri,
                speedup_inplace=t_ref / t_inp, max_rel_err=err)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    planned = cases(args)
    if args.dry_run:
        print(json.dumps(dict(op="gpp", environment=environment(), cases=planned), indent=2))
        return 0
    if args.smoke:
        device = smoke_device()
    elif torch.cuda.is_available():
        device = "cuda"
    else:
        print(no_gpu_message("bench_gpp"), file=sys.stderr)
        return 2
    torch.backends.cudnn.benchmark = True
    rows = []
    for case in planned:
        row = run_case(case, args, device)
        rows.append(row)
        print(f"b{case['batch']:<3} {case['dtype']:<8} {case['layout']:<13} reference {row['reference_ms']:.4f} ms"
              f"  triton {row['triton_ms']:.4f} ms x{row['speedup']:.2f}  in place {row['triton_inplace_ms']:.4f}"
              f" ms x{row['speedup_inplace']:.2f}  err {row['max_rel_err']:.1e}", flush=True)
    write_results(args.out or str(default_out("gpp")),
                  dict(op="gpp", command=" ".join([sys.executable] + sys.argv), environment=environment(),
                       smoke=args.smoke, device=device,
                       timing="perf_counter median, ms (smoke)" if args.smoke else "triton.testing.do_bench median, ms", cudnn_benchmark=True,
                       cudnn_allow_tf32=torch.backends.cudnn.allow_tf32, results=rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
