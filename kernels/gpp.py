"""GPP (paper 3.1.3) in Triton: pyramid pools, 1x1 conv + folded BN + ReLU, bilinear upsample into the concat.

Three launches, none of which touches more than it must:
  1. `_gpp_pool_kernel` - ONE pass over Res-5 for all four levels. A pixel belongs to at most one bin per level,
     so for a tile of pixels the program builds the bins x pixels membership matrix (0/1, exact in any dtype) and
     sums with tl.dot into a [bins x channels] fp32 accumulator (50 bins at the paper's 64 x 64: 6x6 + 3x3 + 2x2 +
     1x1). Programs split channels and, to fill the GPU at batch 1, pixels (then they add atomically).
  2. `_gpp_conv_kernel` - the four 1x1 convolutions on the pooled vectors with eval-mode BatchNorm folded into the
     weights and a shift, then ReLU; rows of the batch are stacked, so each level's weights are read once per
     batch.
  3. `_gpp_upsample_kernel` - bilinear (align_corners=False, PyTorch's source-index rule) upsample of the tiny
     level maps written straight into their channel slices of the preallocated concat buffer, plus the copy of
     Res-5 into its slice in the same launch. When the caller hands an `out` buffer whose first C channels
     already ARE the input (the producer wrote Res-5 there: `gpp_output_buffer`), the copy is skipped, and Res-5
     is read once (pooling) instead of twice and never rewritten.

Bytes at 2048 x 64 x 64 fp16 per image: reference ~ 4 pool reads + cat (read + write of res5 and the four
upsampled maps) ~ 150 MB; here 16 MB (pool) + 16 + 16 MB (copy) + 16 MB (upsampled) = 64 MB, 48 MB with `out`.
"""
from __future__ import annotations

import weakref

import numpy as np
import torch
import triton
import triton.language as tl
from torch import nn

from fastgicn.errors import ConfigError
from fastgicn.models.gpp import GPP, POOL_MULTIPLES, pool_kernels

from ._common import (check_grad, check_input, check_not_exporting, check_params, dot_precision,
                      is_channels_last, next_pow2, output_like, sm_count, tensors_key)

MAX_BINS = 512   # [bins x pixels] membership and [bins x channels] accumulator per program
LEVELS = len(POOL_MULTIPLES)


@triton.jit
def _level_bin(hh, ww, kk, bh, bw, off):
    """Row of the pixel's bin at one level (kernel = stride = kk, bh x bw bins starting at row off), or -1."""
    by = hh // kk
    bx = ww // kk
    return tl.where((by < bh) & (bx < bw), off + by * bw + bx, -1)


@triton.jit
def _gpp_pool_kernel(
    x_ptr, inv_area_ptr, p_ptr,
    C, cov_h, cov_w, sxn, sxc, sxh, sxw, pix_per_split,
    k1, k2, k3, k4, bh1, bw1, bh2, bw2, bh3, bw3, bh4, bw4, off2, off3, off4,
    NB_PAD: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
    ATOMIC: tl.constexpr, PRECISION: tl.constexpr,
):
    n = tl.program_id(0)
    cb = tl.program_id(1)
    ps = tl.program_id(2)
    cc = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = cc < C
    rows = tl.arange(0, NB_PAD)
    x_img = x_ptr + n.to(tl.int64) * sxn + cc[None, :] * sxc
    npix = cov_h * cov_w
    p_lo = ps * pix_per_split
    p_hi = tl.minimum(p_lo + pix_per_split, npix)
    acc = tl.zeros((NB_PAD, BLOCK_C), dtype=tl.float32)
    for p0 in range(p_lo, p_hi, BLOCK_P):
        pp = p0 + tl.arange(0, BLOCK_P)
        p_ok = pp < p_hi
        hh = pp // cov_w
        ww = pp % cov_w
        xt = tl.load(x_img + hh[:, None] * sxh + ww[:, None] * sxw, mask=p_ok[:, None] & c_ok[None, :], other=0.0)
        r1 = _level_bin(hh, ww, k1, bh1, bw1, 0)
        r2 = _level_bin(hh, ww, k2, bh2, bw2, off2)
        r3 = _level_bin(hh, ww, k3, bh3, bw3, off3)
        r4 = _level_bin(hh, ww, k4, bh4, bw4, off4)
        r = rows[:, None]
        member = (r == r1[None, :]) | (r == r2[None, :]) | (r == r3[None, :]) | (r == r4[None, :])
        member = member & p_ok[None, :]
        acc = tl.dot(member.to(xt.dtype), xt, acc, input_precision=PRECISION)
    acc = acc * tl.load(inv_area_ptr + rows)[:, None]   # 1 / kernel^2 per row (0 on padding rows)
    p_off = (n.to(tl.int64) * NB_PAD + rows[:, None]) * C + cc[None, :]
    if ATOMIC:
        tl.atomic_add(p_ptr + p_off, acc, mask=c_ok[None, :])
    else:
        tl.store(p_ptr + p_off, acc, mask=c_ok[None, :])


@triton.jit
def _gpp_conv_kernel(
    p_ptr, w_ptr, shift_ptr, z_ptr, meta_ptr,
    N, C, C_out,
    NB_PAD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    level = tl.program_id(0)
    cob = tl.program_id(1)
    rb = tl.program_id(2)
    nb = tl.load(meta_ptr + 2 * level)        # bins of this level per image
    off = tl.load(meta_ptr + 2 * level + 1)   # first row of this level
    rr = rb * BLOCK_R + tl.arange(0, BLOCK_R)
    if rb * BLOCK_R < N * nb:
        r_ok = rr < N * nb
        prow = (rr // nb).to(tl.int64) * NB_PAD + off + rr % nb
        co = cob * BLOCK_CO + tl.arange(0, BLOCK_CO)
        co_ok = co < C_out
        w_lvl = w_ptr + level.to(tl.int64) * C * C_out
        acc = tl.zeros((BLOCK_R, BLOCK_CO), dtype=tl.float32)
        for c0 in range(0, C, BLOCK_K):
            kk = c0 + tl.arange(0, BLOCK_K)
            k_ok = kk < C
            pv = tl.load(p_ptr + prow[:, None] * C + kk[None, :], mask=r_ok[:, None] & k_ok[None, :], other=0.0)
            wv = tl.load(w_lvl + kk[:, None] * C_out + co[None, :], mask=k_ok[:, None] & co_ok[None, :],
                         other=0.0)
            # the reference pools in the input dtype, then convolves in it: round the pooled means the same way
            acc = tl.dot(pv.to(wv.dtype), wv, acc, input_precision=PRECISION)
        acc += tl.load(shift_ptr + level * C_out + co, mask=co_ok, other=0.0)[None, :]
        acc = tl.maximum(acc, 0.0)
        tl.store(z_ptr + prow[:, None] * C_out + co[None, :], acc, mask=r_ok[:, None] & co_ok[None, :])


@triton.jit
def _gpp_upsample_kernel(
    x_ptr, z_ptr, up_ptr, out_ptr,
    C, C_out, H, W, sxn, sxc, sxh, sxw, son, soc, soh, sow,
    copy_blocks, co_blocks,
    NB_PAD: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    n = tl.program_id(0)
    pb = tl.program_id(1)
    cb = tl.program_id(2)
    pp = pb * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = pp < H * W
    hh = pp // W
    ww = pp % W
    out_img = out_ptr + n.to(tl.int64) * son
    if cb < copy_blocks:
        # Res-5 into channels [0, C) of the concat
        # (names differ from the other branch's: Triton wants one type per name across the two branches)
        cc = cb * BLOCK_C + tl.arange(0, BLOCK_C)
        ok_copy = p_ok[:, None] & (cc < C)[None, :]
        res5 = tl.load(x_ptr + n.to(tl.int64) * sxn + cc[None, :] * sxc + hh[:, None] * sxh + ww[:, None] * sxw,
                       mask=ok_copy)
        tl.store(out_img + cc[None, :] * soc + hh[:, None] * soh + ww[:, None] * sow, res5, mask=ok_copy)
    else:
        level = (cb - copy_blocks) // co_blocks
        co = ((cb - copy_blocks) % co_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
        co_ok = co < C_out
        # per level: bins bh x bw starting at row `off`, source/destination scales (fp32, as PyTorch computes)
        bh = tl.load(up_ptr + 5 * level).to(tl.int32)
        bw = tl.load(up_ptr + 5 * level + 1).to(tl.int32)
        off = tl.load(up_ptr + 5 * level + 2).to(tl.int32)
        scale_h = tl.load(up_ptr + 5 * level + 3)
        scale_w = tl.load(up_ptr + 5 * level + 4)
        sy = tl.maximum(scale_h * (hh.to(tl.float32) + 0.5) - 0.5, 0.0)
        sx = tl.maximum(scale_w * (ww.to(tl.float32) + 0.5) - 0.5, 0.0)
        y0 = sy.to(tl.int32)   # truncation == floor for sy >= 0
        x0 = sx.to(tl.int32)
        ly = sy - y0.to(tl.float32)
        lx = sx - x0.to(tl.float32)
        y1 = tl.where(y0 < bh - 1, y0 + 1, y0)
        x1 = tl.where(x0 < bw - 1, x0 + 1, x0)
        z_img = z_ptr + (n.to(tl.int64) * NB_PAD + off) * C_out + co[None, :]
        ok = p_ok[:, None] & co_ok[None, :]
        v00 = tl.load(z_img + (y0 * bw + x0)[:, None] * C_out, mask=ok, other=0.0)
        v01 = tl.load(z_img + (y0 * bw + x1)[:, None] * C_out, mask=ok, other=0.0)
        v10 = tl.load(z_img + (y1 * bw + x0)[:, None] * C_out, mask=ok, other=0.0)
        v11 = tl.load(z_img + (y1 * bw + x1)[:, None] * C_out, mask=ok, other=0.0)
        lx2 = lx[:, None]
        ly2 = ly[:, None]
        v = (1.0 - ly2) * ((1.0 - lx2) * v00 + lx2 * v01) + ly2 * ((1.0 - lx2) * v10 + lx2 * v11)
        ch = C + level * C_out + co
        tl.store(out_img + ch[None, :] * soc + hh[:, None] * soh + ww[:, None] * sow,
                 v.to(out_ptr.dtype.element_ty), mask=ok)


# Block sizes, checked by compiling for sm_90 (`python -m fastgicn.kernels.compile_report`): no register spills.
CONV_BLOCKS = (32, 64, 32)   # rows, output channels, K
UP_BLOCKS = (32, 64)         # pixels, channels


def pool_blocks(nb_pad: int, c: int, dtype: torch.dtype) -> tuple[int, int, int]:
    """(pixels, channels, warps) of a pooling program: the [bins x channels] fp32 accumulator and the
    [bins x pixels] membership stay at <= 4K and 8K values; fp32 (3xTF32 splits both operands) takes 32 pixels
    (16 at 512 bins); 8 warps from 256 bins. No spills on sm_80 / sm_90 (compile_report)."""
    block_c = min(64, max(16, 4096 // nb_pad), max(16, next_pow2(c)))
    block_p = min(128 if dtype != torch.float32 else 32, max(32, 8192 // nb_pad))
    if dtype == torch.float32 and nb_pad >= 512:
        block_p = 16
    return block_p, block_c, 8 if nb_pad >= 256 else 4


def check_gpp_module(module: nn.Module) -> None:
    """Raise unless module is a GPP in eval mode whose branches are Conv2d(1x1) -> BatchNorm2d -> ReLU."""
    if not isinstance(module, (GPP, TritonGPP)):
        raise ConfigError(f"expected a fastgicn GPP module, got {type(module).__name__}")
    if len(module.branches) != LEVELS:
        raise ConfigError(f"GPP has {len(module.branches)} branches, the kernel computes {LEVELS}")
    c_in = c_out = None
    for i, br in enumerate(module.branches):
        if not (isinstance(br, nn.Sequential) and len(br) == 3 and isinstance(br[0], nn.Conv2d)
                and isinstance(br[1], nn.BatchNorm2d) and isinstance(br[2], nn.ReLU)):
            raise ConfigError(f"GPP branch {i} is {br}; the kernel computes Conv2d(1x1) -> BatchNorm2d -> ReLU")
        conv, bn = br[0], br[1]
        if tuple(conv.kernel_size) != (1, 1) or tuple(conv.stride) != (1, 1) or conv.groups != 1 \
                or tuple(conv.padding) != (0, 0) or tuple(conv.dilation) != (1, 1):
            raise ConfigError(f"GPP branch {i} convolution {conv}: the kernel supports plain 1x1 convolutions")
        if c_in is None:
            c_in, c_out = conv.in_channels, conv.out_channels
        elif (conv.in_channels, conv.out_channels) != (c_in, c_out):
            raise ConfigError("GPP branches must share their channel counts")
        if bn.num_features != c_out:
            raise ConfigError(f"GPP branch {i}: BatchNorm2d has {bn.num_features} features, conv {c_out}")
        if bn.training or bn.running_mean is None or bn.running_var is None:
            raise ConfigError(f"GPP branch {i}: BatchNorm2d is in training mode or keeps no running statistics; "
                              "the kernel folds eval-mode BN. Call model.eval() (or use the reference module "
                              "to train)")


_PACK_CACHE: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def _tensors(module: nn.Module) -> list:
    return [t for br in module.branches for t in (br[0].weight, br[0].bias, br[1].weight, br[1].bias,
                                                   br[1].running_mean, br[1].running_var)]


def _pack(module: nn.Module, x: torch.Tensor) -> dict:
    """Per-level 1x1 weights with BN folded ([4, C, C_out] in the input dtype) and shifts ([4, C_out] fp32),
    cached per module until a parameter or statistic is replaced or changed (a hit skips the full checks)."""
    tensors = _tensors(module)
    key = (tensors_key(tensors), x.dtype, x.device, tuple(br[1].eps for br in module.branches))
    hit = _PACK_CACHE.get(module)
    if hit is not None and hit[0] == key:
        check_grad(tensors, x, "gpp_forward")
        return hit[1]
    check_params(module, x, "gpp_forward")
    dtype = x.dtype
    ws, shifts = [], []
    with torch.no_grad():
        for br in module.branches:
            conv, bn = br[0], br[1]
            w = conv.weight[:, :, 0, 0].double()                          # [C_out, C]
            scale = torch.rsqrt(bn.running_var.double() + bn.eps)
            if bn.weight is not None:
                scale = scale * bn.weight.double()
            shift = -bn.running_mean.double() * scale
            if bn.bias is not None:
                shift = shift + bn.bias.double()
            if conv.bias is not None:
                shift = shift + conv.bias.double() * scale
            ws.append((w * scale[:, None]).t())
            shifts.append(shift)
        packed = dict(w=torch.stack(ws).to(dtype).contiguous(), shift=torch.stack(shifts).float().contiguous())
    _PACK_CACHE[module] = (key, packed)
    return packed


def _levels(h: int, w: int) -> list[tuple[int, int, int, int]]:
    """(kernel, bins_h, bins_w, first row) per level, exactly as the reference's fixed-kernel average pools."""
    out, off = [], 0
    for kk in pool_kernels(min(h, w)):
        bh, bw = h // kk, w // kk
        out.append((kk, bh, bw, off))
        off += bh * bw
    return out


_GEOMETRY: dict = {}


def _geometry(h: int, w: int, nb_pad: int, dev: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-shape tables on the device, made once (a host-to-device copy per call would stall the stream):
    1 / kernel^2 per bin row; (bins, first row) per level; (bins_h, bins_w, first row, scale_h, scale_w) per
    level, the scales in float32 exactly as PyTorch's upsample computes them (input size / output size)."""
    key = (h, w, nb_pad, str(dev))
    if key not in _GEOMETRY:
        levels = _levels(h, w)
        inv_area = torch.zeros(nb_pad, dtype=torch.float32)
        for kk, bh, bw, off in levels:
            inv_area[off:off + bh * bw] = 1.0 / (kk * kk)
        meta = torch.tensor([v for _, bh, bw, off in levels for v in (bh * bw, off)], dtype=torch.int32)
        up = torch.tensor([v for kk, bh, bw, off in levels
                           for v in (bh, bw, off, np.float32(bh) / np.float32(h), np.float32(bw) / np.float32(w))],
                          dtype=torch.float32)
        if len(_GEOMETRY) > 64:
            _GEOMETRY.clear()
        _GEOMETRY[key] = (inv_area.to(dev), meta.to(dev), up.to(dev))
    return _GEOMETRY[key]


def gpp_output_buffer(x: torch.Tensor, module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, res5_view): the concat buffer GPP writes into, and the view of its first C channels.

    A producer that writes Res-5 into `res5_view` (e.g. `torch.add(a, b, out=res5_view)` for the last residual
    add) and passes `out=out` to `gpp_forward(res5_view, ...)` saves the copy of Res-5 into the concat.
    `x` only supplies shape, dtype, device and memory format.
    """
    c = x.shape[1]
    out = output_like(x, module.out_channels if hasattr(module, "out_channels") else c)
    return out, out[:, :c]


def _check_out(out: torch.Tensor, x: torch.Tensor, channels: int) -> bool:
    """Validate a caller-supplied output; True when its first C channels already are x (no copy needed)."""
    n, c, h, w = x.shape
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (n, channels, h, w):
        raise ConfigError(f"gpp_forward out: expected shape {(n, channels, h, w)}, got "
                          f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}")
    if out.dtype != x.dtype or out.device != x.device:
        raise ConfigError(f"gpp_forward out: {out.dtype} on {out.device}, input {x.dtype} on {x.device}")
    head = out[:, :c]
    aliased = head.data_ptr() == x.data_ptr() and head.stride() == x.stride()
    if not aliased:
        # any other overlap would make the copy read what it writes
        lo, hi = x.data_ptr(), x.data_ptr() + x.untyped_storage().nbytes()
        olo = out.data_ptr()
        if x.untyped_storage().data_ptr() == out.untyped_storage().data_ptr() or (lo <= olo < hi):
            raise ConfigError("gpp_forward out overlaps the input without being its first C channels; pass "
                              "out=None or the buffer from gpp_output_buffer with x = its res5 view")
    return aliased


def gpp_forward(x: torch.Tensor, module: nn.Module, out: torch.Tensor | None = None,
                pixel_split: int = 0) -> torch.Tensor:
    """`module(x)` for a GPP module (eval mode), computed by the Triton kernels, in x's dtype and memory format.

    `out` (optional): the N x (C + 4 C_out) x H x W concat buffer to write; if `x` is its first C channels
    (see `gpp_output_buffer`) Res-5 is not copied. `pixel_split` (0 = automatic) splits the pooling pass over
    pixels as well as channels (atomic fp32 adds) so batch 1 fills the GPU.
    """
    check_gpp_module(module)
    conv0 = module.branches[0][0]
    c_in, c_out = conv0.in_channels, conv0.out_channels
    check_input(x, "gpp_forward input", c_in)
    n, c, h, w = x.shape
    levels = _levels(h, w)   # raises ConfigError below 6 x 6, as the reference does
    total_bins = sum(bh * bw for _, bh, bw, _ in levels)
    nb_pad = max(16, next_pow2(total_bins))
    if nb_pad > MAX_BINS:
        raise ConfigError(f"GPP on a {h} x {w} map has {total_bins} pooled bins; the kernel holds at most "
                          f"{MAX_BINS} (very elongated maps): use the reference module")
    channels = c + LEVELS * c_out
    copy = True
    if out is None:
        out = output_like(x, channels)
    else:
        copy = not _check_out(out, x, channels)
    p = _pack(module, x)
    dev = x.device
    precision = dot_precision(x.dtype, dev)   # the 1x1 convs: as cuDNN would (TF32 if allowed)
    # pooling sums exact 0/1 memberships; the reference pools in true fp32, so never plain TF32 here
    pool_precision = dot_precision(x.dtype, dev, allow_tf32=False)

    # 1. pool: every level from one pass over the covered (top-left) region of level 1, the largest one
    k1, bh1, bw1, _ = levels[0]
    cov_h, cov_w = bh1 * k1, bw1 * k1
    inv_area, meta, up = _geometry(h, w, nb_pad, dev)
    block_p, block_c, pool_warps = pool_blocks(nb_pad, c, x.dtype)
    c_blocks = triton.cdiv(c, block_c)
    npix = cov_h * cov_w
    split = pixel_split or max(1, min(triton.cdiv(2 * sm_count(dev), n * c_blocks), npix // (8 * block_p)))
    pix_per_split = triton.cdiv(triton.cdiv(npix, split), block_p) * block_p
    split = triton.cdiv(npix, pix_per_split)
    pooled = (torch.zeros if split > 1 else torch.empty)((n, nb_pad, c), dtype=torch.float32, device=dev)
    lv = [kk for kk, _, _, _ in levels] + [v for _, bh, bw, _ in levels for v in (bh, bw)]
    _gpp_pool_kernel[(n, c_blocks, split)](
        x, inv_area, pooled, c, cov_h, cov_w, *x.stride(), pix_per_split,
        *lv, levels[1][3], levels[2][3], levels[3][3],
        NB_PAD=nb_pad, BLOCK_P=block_p, BLOCK_C=block_c, ATOMIC=split > 1, PRECISION=pool_precision,
        num_warps=pool_warps, num_stages=2)

    # 2. 1x1 conv + folded BN + ReLU per level
    z = torch.empty((n, nb_pad, c_out), dtype=torch.float32, device=dev)
    max_rows = n * max(bh * bw for _, bh, bw, _ in levels)
    block_r = min(CONV_BLOCKS[0], max(16, next_pow2(max_rows)))
    block_co = min(CONV_BLOCKS[1], max(16, next_pow2(c_out)))
    block_k = min(CONV_BLOCKS[2], max(16, next_pow2(c)))
    _gpp_conv_kernel[(LEVELS, triton.cdiv(c_out, block_co), triton.cdiv(max_rows, block_r))](
        pooled, p["w"], p["shift"], z, meta, n, c, c_out,
        NB_PAD=nb_pad, BLOCK_R=block_r, BLOCK_CO=block_co, BLOCK_K=block_k, PRECISION=precision,
        num_warps=4, num_stages=2)

    # 3. upsample into the concat (+ the Res-5 copy unless the caller already put it there)
    block_pu, block_cu = UP_BLOCKS
    copy_blocks = triton.cdiv(c, block_cu) if copy else 0
    co_blocks = triton.cdiv(c_out, block_cu)
    _gpp_upsample_kernel[(n, triton.cdiv(h * w, block_pu), copy_blocks + LEVELS * co_blocks)](
        x, z, up, out, c, c_out, h, w, *x.stride(), *out.stride(), copy_blocks, co_blocks,
        NB_PAD=nb_pad, BLOCK_P=block_pu, BLOCK_C=block_cu, num_warps=4)
    return out


class TritonGPP(nn.Module):
    """A GPP whose forward runs the Triton kernels. Holds the reference module's own `branches`, so state_dict
    keys and parameters are shared; `to_reference()` gives the reference module back."""

    def __init__(self, reference: GPP):
        super().__init__()
        if not isinstance(reference, GPP):
            raise ConfigError(f"expected a fastgicn GPP module, got {type(reference).__name__}")
        self.branches = reference.branches
        self._reference = (reference,)

    @property
    def in_channels(self) -> int:
        return self.branches[0][0].in_channels

    @property
    def out_channels(self) -> int:
        return self.in_channels + len(self.branches) * self.branches[0][0].out_channels

    def to_reference(self) -> GPP:
        return self._reference[0]

    def forward(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        check_not_exporting("TritonGPP")
        return gpp_forward(x, self, out=out)

    def extra_repr(self) -> str:
        return f"in={self.in_channels}, out={self.out_channels}, triton"


__all__ = ["gpp_forward", "gpp_output_buffer", "TritonGPP", "check_gpp_module", "is_channels_last"]
