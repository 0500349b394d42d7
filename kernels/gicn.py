"""GICN (paper Fig. 2) in Triton: a_col(a_row(x)) + b_row(b_col(x)) in two launches.

Design (why two kernels and not one):
  stage 1 `_gicn_stage1_kernel` - the first convolution of BOTH branches (a_row: 1xk, b_col: kx1) as one implicit
      GEMM over a 2-D pixel tile: one flat loop over (C_in chunk, tap), taps innermost, loads the input tile at
      the tap's column shift (branch A) and row shift (branch B) and accumulates two [pixels x C_out] fp32
      accumulators with tl.dot. Consecutive iterations read overlapping tiles of the same channels, so after a
      chunk's first tap they hit L1/L2 and DRAM sees the input about once for both branches (the cuDNN sequence
      reads it once per branch). An unrolled tap loop would keep 2k tiles live: 147 KB of shared memory and
      register spills at k = 7 on sm_90, which is why the loop is flat. It writes the 2 x C_out fp32
      intermediates (without bias) to a small scratch buffer. When the grid is too small to fill the GPU (batch 1
      at Res-5: 4096 pixels) the C_in reduction is split across programs that atomically add (split-K).
  stage 2 `_gicn_stage2_kernel` - the second convolutions (a_col: kx1 on branch A, b_row: 1xk on branch B), the
      first-stage biases (added only inside the image: the reference pads the intermediate with zeros, not bias),
      the second-stage biases and the branch sum, stored in the input's dtype and memory format.
  Stage 1 holds all the work at Res-4/5 (C_in*C_out*k*2 MACs per pixel against C_out*C_out*k*2 for stage 2, 64x
  less at Res-5) and the intermediate is 2 x 32 fp32 channels per pixel (~6% of the bytes of a 2048-channel fp16
  input). A single fused kernel would have to recompute stage-1 halos ((T + k - 1) / T extra work on the dominant
  term, 1.4x for 16-pixel tiles at k = 7) or synchronise across programs; both cost more than the round trip.

Any k in 1..15 (odd), any C_in / H / W, C_out up to 64, any strides (NCHW and channels-last read in place),
float32 / float16 (and bfloat16 on a GPU). Public entry: `gicn_forward(x, gicn_module)`; `TritonGICN` wraps it as a
module holding the reference module's own convolutions (same state_dict keys).
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import nn

from fastgicn.errors import ConfigError
from fastgicn.models.gicn import GICN, MAX_K

from ._common import (check_grad, check_input, check_not_exporting, check_params, dot_precision, next_pow2,
                      output_like, sm_count, tensors_key)

MAX_C_OUT = 64   # two C_out-wide fp32 accumulators per program; 128 spills registers in stage 2 (sm90)


@triton.jit
def _gicn_stage1_kernel(
    x_ptr, wa_ptr, wb_ptr, t_ptr,
    C_in, H, W, sxn, sxc, sxh, sxw,
    tiles_w, tiles_per_img, k_per_split,
    KS: tl.constexpr, CO_PAD: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_K: tl.constexpr,
    ATOMIC: tl.constexpr, PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    n = pid // tiles_per_img
    tile = pid % tiles_per_img
    h0 = (tile // tiles_w) * BLOCK_H
    w0 = (tile % tiles_w) * BLOCK_W
    PAD: tl.constexpr = KS // 2
    BLOCK_M: tl.constexpr = BLOCK_H * BLOCK_W

    offs_m = tl.arange(0, BLOCK_M)
    hh = h0 + offs_m // BLOCK_W
    ww = w0 + offs_m % BLOCK_W
    row_ok = hh < H
    col_ok = ww < W
    offs_k = tl.arange(0, BLOCK_K)
    offs_co = tl.arange(0, CO_PAD)
    x_img = x_ptr + n.to(tl.int64) * sxn

    acc_a = tl.zeros((BLOCK_M, CO_PAD), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK_M, CO_PAD), dtype=tl.float32)
    c_lo = pid_k * k_per_split
    c_hi = tl.minimum(c_lo + k_per_split, C_in)
    # One flat loop over (C_in chunk, tap), taps innermost: the 2 shifted tiles of consecutive iterations overlap,
    # so after a chunk's first tap its data comes from L1, and DRAM sees the input once. A flat loop (not an
    # unrolled tap loop) keeps only one iteration's tiles live, which the software pipeliner can multi-buffer.
    n_iter = tl.cdiv(c_hi - c_lo, BLOCK_K) * KS
    for it in range(0, n_iter):
        j = it % KS
        cc = c_lo + (it // KS) * BLOCK_K + offs_k
        c_ok = cc < c_hi
        x_c = x_img + cc[None, :] * sxc
        w_c = (j * C_in + cc)[:, None] * CO_PAD + offs_co[None, :]
        # branch A (1 x k): tap j reads column w + j - PAD of the same row
        ws = ww + (j - PAD)
        ok_a = row_ok & (ws >= 0) & (ws < W)
        xa = tl.load(x_c + hh[:, None] * sxh + ws[:, None] * sxw, mask=ok_a[:, None] & c_ok[None, :], other=0.0)
        wa = tl.load(wa_ptr + w_c, mask=c_ok[:, None], other=0.0)
        acc_a = tl.dot(xa, wa, acc_a, input_precision=PRECISION)
        # branch B (k x 1): tap j reads row h + j - PAD of the same column
        hs = hh + (j - PAD)
        ok_b = col_ok & (hs >= 0) & (hs < H)
        xb = tl.load(x_c + hs[:, None] * sxh + ww[:, None] * sxw, mask=ok_b[:, None] & c_ok[None, :], other=0.0)
        wb = tl.load(wb_ptr + w_c, mask=c_ok[:, None], other=0.0)
        acc_b = tl.dot(xb, wb, acc_b, input_precision=PRECISION)

    # scratch layout: [N, H, W, 2, CO_PAD] fp32 (branch A then branch B, channels contiguous)
    pix = (n.to(tl.int64) * H + hh) * W + ww
    t_off = pix[:, None] * (2 * CO_PAD) + offs_co[None, :]
    ok = (row_ok & col_ok)[:, None]
    if ATOMIC:
        tl.atomic_add(t_ptr + t_off, acc_a, mask=ok)
        tl.atomic_add(t_ptr + t_off + CO_PAD, acc_b, mask=ok)
    else:
        tl.store(t_ptr + t_off, acc_a, mask=ok)
        tl.store(t_ptr + t_off + CO_PAD, acc_b, mask=ok)


@triton.jit
def _gicn_stage2_kernel(
    t_ptr, wac_ptr, wbr_ptr, b1_ptr, b2_ptr, y_ptr,
    C_out, H, W, syn, syc, syh, syw,
    tiles_w, tiles_per_img,
    KS: tl.constexpr, CO_PAD: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    n = pid // tiles_per_img
    tile = pid % tiles_per_img
    h0 = (tile // tiles_w) * BLOCK_H
    w0 = (tile % tiles_w) * BLOCK_W
    PAD: tl.constexpr = KS // 2
    BLOCK_M: tl.constexpr = BLOCK_H * BLOCK_W

    offs_m = tl.arange(0, BLOCK_M)
    hh = h0 + offs_m // BLOCK_W
    ww = w0 + offs_m % BLOCK_W
    row_ok = hh < H
    col_ok = ww < W
    offs_co = tl.arange(0, CO_PAD)
    t_img = t_ptr + n.to(tl.int64) * H * W * (2 * CO_PAD)
    bias_a = tl.load(b1_ptr + offs_co)           # a_row.bias (zero-padded to CO_PAD)
    bias_b = tl.load(b1_ptr + CO_PAD + offs_co)  # b_col.bias
    w_off = offs_co[:, None] * CO_PAD + offs_co[None, :]

    acc = tl.zeros((BLOCK_M, CO_PAD), dtype=tl.float32)
    for i in range(KS):   # a runtime loop: an unrolled one keeps 2k tiles live and spills at large k
        # branch A, second conv (k x 1): row h + i - PAD of the intermediate; zero outside the image
        hs = hh + (i - PAD)
        ok_a = col_ok & (hs >= 0) & (hs < H)
        ta = tl.load(t_img + (hs * W + ww)[:, None] * (2 * CO_PAD) + offs_co[None, :], mask=ok_a[:, None],
                     other=0.0)
        ta = tl.where(ok_a[:, None], ta + bias_a[None, :], 0.0)
        acc = tl.dot(ta, tl.load(wac_ptr + i * CO_PAD * CO_PAD + w_off), acc, input_precision=PRECISION)
        # branch B, second conv (1 x k): column w + i - PAD
        ws = ww + (i - PAD)
        ok_b = row_ok & (ws >= 0) & (ws < W)
        tb = tl.load(t_img + (hh * W + ws)[:, None] * (2 * CO_PAD) + CO_PAD + offs_co[None, :],
                     mask=ok_b[:, None], other=0.0)
        tb = tl.where(ok_b[:, None], tb + bias_b[None, :], 0.0)
        acc = tl.dot(tb, tl.load(wbr_ptr + i * CO_PAD * CO_PAD + w_off), acc, input_precision=PRECISION)

    acc += tl.load(b2_ptr + offs_co)[None, :]    # a_col.bias + b_row.bias
    y_off = (n.to(tl.int64) * syn + offs_co[None, :] * syc + hh[:, None] * syh + ww[:, None] * syw)
    ok = (row_ok & col_ok)[:, None] & (offs_co < C_out)[None, :]
    tl.store(y_ptr + y_off, acc.to(y_ptr.dtype.element_ty), mask=ok)


@dataclass(frozen=True)
class GicnConfig:
    """Launch parameters. `split_k=0` lets the launcher pick (split C_in only when the grid cannot fill the GPU)."""
    block_h: int = 8
    block_w: int = 16
    block_k: int = 32
    split_k: int = 0
    num_warps: int = 4
    num_stages: int = 2

    def check(self) -> None:
        for name in ("block_h", "block_w", "block_k"):
            v = getattr(self, name)
            if v < 1 or v & (v - 1):
                raise ConfigError(f"GicnConfig.{name}={v}: use a power of two")
        if self.block_h * self.block_w < 16 or self.block_k < 16:
            raise ConfigError(f"{self}: tl.dot needs block_h * block_w >= 16 and block_k >= 16")
        if self.split_k < 0:
            raise ConfigError(f"GicnConfig.split_k={self.split_k}: use 0 (automatic) or a positive count")


def default_config(x, c_out: int, k: int, precision: str = "tf32") -> GicnConfig:
    """Untuned defaults (no GPU has timed them yet; `bench/bench_gicn.py --sweep` does), chosen so that compiled
    for sm_80 and sm_90 they fit in <= 64 KB of shared memory without register spills (checked by `python -m
    fastgicn.kernels.compile_report`): 128-pixel tiles at C_out 32 (64 beyond, and for 3xTF32), K chunks of 64
    channels for 16-bit inputs, 32 / 16 for fp32, 8 warps (4 for 3xTF32 at C_out 32), two pipeline stages.
    `x` needs only .shape and .dtype."""
    _, c_in, _, w = x.shape
    co_pad = max(16, next_pow2(c_out))
    exact = x.dtype == torch.float32 and precision == "tf32x3"
    block_w = min(16, max(4, next_pow2(w)))
    block_m = 128 if (co_pad <= 32 and not exact) else 64
    block_h = max(1, block_m // block_w)
    if x.dtype.itemsize == 2:
        block_k = 64
    else:
        block_k = 32 if (co_pad <= 32 and not exact) else 16
    block_k = min(block_k, max(16, next_pow2(c_in)))
    return GicnConfig(block_h=block_h, block_w=block_w, block_k=block_k,
                      num_warps=4 if (exact and co_pad <= 32) else 8, num_stages=2)


def stage2_blocks(co_pad: int, block_w: int, precision: str, sm90: bool = True) -> tuple[int, int, int]:
    """(block_h, block_w, warps) of stage 2: 128 pixels at C_out 32, 64 at C_out 64, halved for 3xTF32; at
    C_out 64 with 3xTF32, 64 pixels / 8 warps on sm_90 and 32 / 4 before (no spills either way)."""
    if precision == "tf32x3" and co_pad >= 64:
        block_m, warps = (64, 8) if sm90 else (32, 4)
    else:
        block_m, warps = (4096 // co_pad) // (2 if precision == "tf32x3" else 1), 4
    block_w = min(block_w, block_m)
    return max(1, block_m // block_w), block_w, warps


def check_gicn_module(module: nn.Module) -> int:
    """The module's k, after checking it is a GICN whose convolutions the kernel reproduces exactly."""
    if not isinstance(module, (GICN, TritonGICN)):
        raise ConfigError(f"expected a fastgicn GICN module, got {type(module).__name__}")
    k = module.k
    if not isinstance(k, int) or k < 1 or k > MAX_K or k % 2 == 0:
        raise ConfigError(f"GICN k={k!r}: the kernel supports odd k in 1..{MAX_K}")
    p = k // 2
    expect = {"a_row": ((1, k), (0, p)), "a_col": ((k, 1), (p, 0)),
              "b_col": ((k, 1), (p, 0)), "b_row": ((1, k), (0, p))}
    for name, (ksize, pad) in expect.items():
        conv = getattr(module, name)
        if not isinstance(conv, nn.Conv2d):
            raise ConfigError(f"GICN.{name} is {type(conv).__name__}, expected nn.Conv2d")
        if (tuple(conv.kernel_size) != ksize or tuple(conv.padding) != pad or tuple(conv.stride) != (1, 1)
                or tuple(conv.dilation) != (1, 1) or conv.groups != 1 or conv.padding_mode != "zeros"):
            raise ConfigError(f"GICN.{name} {conv}: the kernel supports kernel {ksize}, padding {pad}, stride 1, "
                              "dilation 1, groups 1, zero padding only")
    c_out = module.a_row.out_channels
    if module.a_col.in_channels != c_out or module.b_row.in_channels != c_out or module.b_col.out_channels != c_out \
            or module.a_col.out_channels != c_out or module.b_row.out_channels != c_out:
        raise ConfigError("GICN: all four convolutions must share one C_out")
    if c_out > MAX_C_OUT:
        raise ConfigError(f"GICN C_out={c_out}: the kernel keeps C_out in registers and supports up to "
                          f"{MAX_C_OUT}; use the reference module")
    return k


_PACK_CACHE: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def _bias(conv: nn.Conv2d, c_out: int, device) -> torch.Tensor:
    if conv.bias is None:
        return torch.zeros(c_out, dtype=torch.float32, device=device)
    return conv.bias.detach().float()


def _tensors(module: nn.Module) -> list:
    return [t for conv in (module.a_row, module.a_col, module.b_col, module.b_row) for t in (conv.weight, conv.bias)]


def _pack(module: nn.Module, x: torch.Tensor) -> dict:
    """Weights in the kernels' layouts, cached per module until a parameter is replaced or changed. A cache hit
    skips the full parameter checks (device and dtype cannot change without replacing the tensor)."""
    tensors = _tensors(module)
    key = (tensors_key(tensors), x.dtype, x.device)
    hit = _PACK_CACHE.get(module)
    if hit is not None and hit[0] == key:
        check_grad(tensors, x, "gicn_forward")
        return hit[1]
    check_params(module, x, "gicn_forward")
    dtype = x.dtype
    k = module.k
    c_in, c_out = module.a_row.in_channels, module.a_row.out_channels
    co_pad = max(16, next_pow2(c_out))
    dev = module.a_row.weight.device
    with torch.no_grad():
        wa = torch.zeros(k, c_in, co_pad, dtype=dtype, device=dev)
        wa[:, :, :c_out] = module.a_row.weight[:, :, 0, :].permute(2, 1, 0).to(dtype)   # [j, ci, co]
        wb = torch.zeros(k, c_in, co_pad, dtype=dtype, device=dev)
        wb[:, :, :c_out] = module.b_col.weight[:, :, :, 0].permute(2, 1, 0).to(dtype)   # [i, ci, co]
        wac = torch.zeros(k, co_pad, co_pad, dtype=torch.float32, device=dev)
        wac[:, :c_out, :c_out] = module.a_col.weight[:, :, :, 0].permute(2, 1, 0).float()  # [i, ci, co2]
        wbr = torch.zeros(k, co_pad, co_pad, dtype=torch.float32, device=dev)
        wbr[:, :c_out, :c_out] = module.b_row.weight[:, :, 0, :].permute(2, 1, 0).float()  # [j, ci, co2]
        b1 = torch.zeros(2, co_pad, dtype=torch.float32, device=dev)
        b1[0, :c_out] = _bias(module.a_row, c_out, dev)
        b1[1, :c_out] = _bias(module.b_col, c_out, dev)
        b2 = torch.zeros(co_pad, dtype=torch.float32, device=dev)
        b2[:c_out] = _bias(module.a_col, c_out, dev) + _bias(module.b_row, c_out, dev)
    packed = dict(wa=wa, wb=wb, wac=wac, wbr=wbr, b1=b1, b2=b2, co_pad=co_pad, c_out=c_out, k=k)
    _PACK_CACHE[module] = (key, packed)
    return packed


def gicn_forward(x: torch.Tensor, module: nn.Module, config: GicnConfig | None = None) -> torch.Tensor:
    """`module(x)` for a GICN module, computed by the Triton kernels; output in x's dtype and memory format.

    Raises ConfigError for anything the kernels do not compute exactly like the reference (autograd, mixed
    dtypes or devices, an unsupported dtype or module layout) instead of computing something else.
    """
    k = check_gicn_module(module)
    check_input(x, "gicn_forward input", module.a_row.in_channels)
    p = _pack(module, x)
    precision = dot_precision(x.dtype, x.device)
    cfg = config or default_config(x, module.a_row.out_channels, k, precision)
    cfg.check()
    n, c_in, h, w = x.shape
    co_pad, c_out = p["co_pad"], p["c_out"]

    tiles_w = triton.cdiv(w, cfg.block_w)
    tiles_per_img = triton.cdiv(h, cfg.block_h) * tiles_w
    programs = n * tiles_per_img
    k_chunks = triton.cdiv(c_in, cfg.block_k)
    split = cfg.split_k
    if split == 0:
        # fill ~2 waves of SMs, each split keeping at least 4 K chunks of work
        split = max(1, min(triton.cdiv(2 * sm_count(x.device), programs), k_chunks // 4))
    split = min(split, k_chunks)
    k_per_split = triton.cdiv(k_chunks, split) * cfg.block_k
    split = triton.cdiv(c_in, k_per_split)

    alloc = torch.zeros if split > 1 else torch.empty
    t = alloc((n, h, w, 2, co_pad), dtype=torch.float32, device=x.device)
    _gicn_stage1_kernel[(programs, split)](
        x, p["wa"], p["wb"], t, c_in, h, w, *x.stride(), tiles_w, tiles_per_img, k_per_split,
        KS=k, CO_PAD=co_pad, BLOCK_H=cfg.block_h, BLOCK_W=cfg.block_w, BLOCK_K=cfg.block_k,
        ATOMIC=split > 1, PRECISION=precision, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    y = output_like(x, c_out)
    # stage 2 multiplies fp32 intermediates: for a 16-bit output TF32 is ample; for fp32 follow the policy
    precision2 = dot_precision(torch.float32, x.device, allow_tf32=True if x.dtype != torch.float32 else None)
    sm90 = x.device.type == "cuda" and torch.cuda.get_device_capability(x.device) >= (9, 0)
    bh2, bw2, warps2 = stage2_blocks(co_pad, cfg.block_w, precision2, sm90)
    tiles_w2 = triton.cdiv(w, bw2)
    tiles_per_img2 = triton.cdiv(h, bh2) * tiles_w2
    _gicn_stage2_kernel[(n * tiles_per_img2,)](
        t, p["wac"], p["wbr"], p["b1"], p["b2"], y, c_out, h, w, *y.stride(), tiles_w2, tiles_per_img2,
        KS=k, CO_PAD=co_pad, BLOCK_H=bh2, BLOCK_W=bw2, PRECISION=precision2, num_warps=warps2, num_stages=1)
    return y


class TritonGICN(nn.Module):
    """A GICN whose forward runs the Triton kernels. Holds the reference module's own four convolutions, so
    state_dict keys and parameters are shared with it; `to_reference()` gives the reference module back."""

    def __init__(self, reference: GICN, config: GicnConfig | None = None):
        super().__init__()
        check_gicn_module(reference)
        self.k = reference.k
        self.a_row, self.a_col = reference.a_row, reference.a_col
        self.b_col, self.b_row = reference.b_col, reference.b_row
        self.config = config
        self._reference = (reference,)  # a tuple, so it is not registered as a submodule (no duplicate keys)

    @property
    def in_channels(self) -> int:
        return self.a_row.in_channels

    @property
    def out_channels(self) -> int:
        return self.a_row.out_channels

    def to_reference(self) -> GICN:
        return self._reference[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_not_exporting("TritonGICN")
        return gicn_forward(x, self, self.config)

    def extra_repr(self) -> str:
        return f"k={self.k}, in={self.in_channels}, out={self.out_channels}, triton"
