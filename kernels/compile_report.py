"""`python -m fastgicn.kernels.compile_report`: compile the kernels for NVIDIA GPUs, no GPU needed.

The interpreter checks what the kernels compute, not whether they compile, nor what they cost. This compiles
each kernel with the block sizes the launchers pick for the paper's shapes, for sm_80 (A100) and sm_90 (H100),
with Triton's bundled ptxas, and reports per kernel: shared memory, registers per thread, and spills (stack /
local memory). A row fails when the kernel would not launch (shared memory above the GPU's limit) or spills.
Exit status 0 when every row passes, 1 otherwise, 2 when it cannot run (TRITON_INTERPRET=1 is set).

    python -m fastgicn.kernels.compile_report               # every case, sm_80 and sm_90 (minutes on a CPU)
    python -m fastgicn.kernels.compile_report --quick       # each kernel once, sm_90, fp16
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from types import SimpleNamespace

SMEM_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}


def _compile(fn, pointer_types: dict, constexprs: dict, arch: int, num_warps: int, num_stages: int) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {name: ("constexpr" if name in constexprs else pointer_types.get(name, "i32"))
                 for name in fn.arg_names}
    # the JIT marks 16-byte-aligned pointers (torch allocations are); do the same
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in pointer_types}
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                            options=dict(num_warps=num_warps, num_stages=num_stages))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(kernel.asm["cubin"])
        tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        usage = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True).stdout
    found = dict(re.findall(r"(REG|STACK|LOCAL):(\d+)", usage))
    return dict(shared=kernel.metadata.shared, regs=int(found.get("REG", -1)), stack=int(found.get("STACK", -1)),
                local=int(found.get("LOCAL", -1)))


def _ptr(dtype) -> str:
    import torch

    return {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}[dtype]


def gicn_jobs(dtype, c_in: int, side: int, k: int, c_out: int = 32, precisions=None, arch: int = 90):
    """What gicn_forward launches for an N x c_in x side x side input: (label, fn, pointers, constexprs, warps,
    stages) per kernel."""
    import torch

    from . import gicn as G
    from ._common import next_pow2

    co_pad = max(16, next_pow2(c_out))
    t = _ptr(dtype)
    name = str(dtype).replace("torch.", "")
    if precisions is None:   # fp32 follows cuDNN's TF32 flag (tf32) or is exact (tf32x3); 16-bit ignores it
        precisions = ["tf32", "tf32x3"] if dtype == torch.float32 else ["tf32"]
    jobs = []
    for prec in precisions:
        cfg = G.default_config(SimpleNamespace(shape=(1, c_in, side, side), dtype=dtype), c_out, k, prec)
        tag = f"{name}{'/' + prec if dtype == torch.float32 else ''}"
        for atomic in (False, True):
            jobs.append((f"gicn stage1 C_in={c_in} k={k} C_out={c_out} {tag}{' split-K' if atomic else ''}",
                         G._gicn_stage1_kernel, dict(x_ptr=t, wa_ptr=t, wb_ptr=t, t_ptr="*fp32"),
                         dict(KS=k, CO_PAD=co_pad, BLOCK_H=cfg.block_h, BLOCK_W=cfg.block_w, BLOCK_K=cfg.block_k,
                              ATOMIC=atomic, PRECISION=prec), cfg.num_warps, cfg.num_stages))
        prec2 = prec if dtype == torch.float32 else "tf32"   # stage 2 multiplies fp32 intermediates
        bh2, bw2, warps2 = G.stage2_blocks(co_pad, cfg.block_w, prec2, arch >= 90)
        jobs.append((f"gicn stage2 k={k} C_out={c_out} {tag}", G._gicn_stage2_kernel,
                     dict(t_ptr="*fp32", wac_ptr="*fp32", wbr_ptr="*fp32", b1_ptr="*fp32", b2_ptr="*fp32", y_ptr=t),
                     dict(KS=k, CO_PAD=co_pad, BLOCK_H=bh2, BLOCK_W=bw2, PRECISION=prec2), warps2, 1))
    return jobs


def gpp_jobs(dtype, c_in: int, side: int, c_out: int, width: int | None = None):
    import torch

    from . import gpp as P
    from ._common import next_pow2

    width = width or side
    total = sum(bh * bw for _, bh, bw, _ in P._levels(side, width))
    nb_pad = max(16, next_pow2(total))
    block_p, block_c, warps = P.pool_blocks(nb_pad, c_in, dtype)
    t = _ptr(dtype)
    fp32 = dtype == torch.float32
    return [
        (f"gpp pool {side}x{width} bins={total} {str(dtype).replace('torch.', '')}", P._gpp_pool_kernel,
         dict(x_ptr=t, inv_area_ptr="*fp32", p_ptr="*fp32"),
         dict(NB_PAD=nb_pad, BLOCK_P=block_p, BLOCK_C=block_c, ATOMIC=True, PRECISION="tf32x3" if fp32 else "ieee"),
         warps, 2),
        (f"gpp conv C={c_in} C_out={c_out} {str(dtype).replace('torch.', '')}", P._gpp_conv_kernel,
         dict(p_ptr="*fp32", w_ptr=t, shift_ptr="*fp32", z_ptr="*fp32", meta_ptr="*i32"),
         dict(NB_PAD=nb_pad, BLOCK_R=P.CONV_BLOCKS[0], BLOCK_CO=P.CONV_BLOCKS[1], BLOCK_K=P.CONV_BLOCKS[2],
              PRECISION="tf32" if fp32 else "ieee"), 4, 2),
        (f"gpp upsample + copy {str(dtype).replace('torch.', '')}", P._gpp_upsample_kernel, dict(x_ptr=t, z_ptr="*fp32", up_ptr="*fp32", out_ptr=t),
         dict(NB_PAD=nb_pad, BLOCK_P=P.UP_BLOCKS[0], BLOCK_C=P.UP_BLOCKS[1]), 4, 1),
    ]


def all_jobs(quick: bool, arch: int = 90):
    import torch

    if quick:
        stage1, _, stage2 = gicn_jobs(torch.float16, 2048, 64, 7, arch=arch)
        return [stage1, stage2] + gpp_jobs(torch.float16, 2048, 64, 512)
    jobs = []
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for k in (1, 7, 15):
            jobs += gicn_jobs(dtype, 2048, 64, k, arch=arch)
        jobs += gicn_jobs(dtype, 2048, 64, 7, c_out=64, arch=arch)
        jobs += gpp_jobs(dtype, 2048, 64, 512)
        jobs += gpp_jobs(dtype, 256, 8, 64)[:1]   # 85 bins (width-0.125 model at a 64 x 64 input)
        jobs += gpp_jobs(dtype, 256, 6, 64, width=48)[:1]   # 400 bins (an elongated map; MAX_BINS is 512)
    return jobs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastgicn.kernels.compile_report", description=__doc__.split("\n")[0])
    p.add_argument("--arch", nargs="+", type=int, default=None, help="compute capabilities (default 80 90)")
    p.add_argument("--quick", action="store_true", help="each kernel once, fp16, sm_90")
    args = p.parse_args(argv)
    from ._common import INTERPRETED

    if INTERPRETED:
        print("compile_report: TRITON_INTERPRET=1 is set, so the kernels are interpreted and cannot be compiled; "
              "run it without TRITON_INTERPRET", file=sys.stderr)
        return 2
    archs = args.arch or ([90] if args.quick else [80, 90])
    failed = 0
    print(f"{'kernel':58s} {'arch':5s} {'smem KB':>8s} {'regs':>5s} {'spill B':>8s}  result")
    for arch in archs:
        for label, fn, pointers, constexprs, warps, stages in all_jobs(args.quick, arch):
            try:
                r = _compile(fn, pointers, constexprs, arch, warps, stages)
            except Exception as e:   # a compile error is a failed row, with its message
                failed += 1
                print(f"{label:58s} sm{arch:<3d} FAIL {type(e).__name__}: {str(e).splitlines()[-1][:200]}")
                continue
            spill = max(r["stack"], 0) + max(r["local"], 0)
            limit = SMEM_LIMIT.get(arch, 99 * 1024)
            ok = r["shared"] <= limit and spill == 0 and r["regs"] > 0
            failed += not ok
            why = "" if ok else (" (shared memory over the limit)" if r["shared"] > limit else " (spills)")
            print(f"{label:58s} sm{arch:<3d} {r['shared'] / 1024:8.1f} {r['regs']:5d} {spill:8d}  "
                  f"{'PASS' if ok else 'FAIL'}{why}", flush=True)
    print(f"{failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
