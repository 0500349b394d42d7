"""What the GICN and GPP kernel tests share: the reference run and the per-dtype tolerance check."""
import copy

import torch

# |y - ref| <= atol * max|ref| + rtol * |ref|: fp32 is exact accumulation order aside (TF32 off in these tests);
# 16-bit outputs are one rounding of an fp32-accumulated value.
TOL = {torch.float32: (2e-5, 1e-4), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}


def reference(module, x):
    """The reference module in fp32 on the same (already rounded) input values."""
    with torch.no_grad():
        return copy.deepcopy(module).float()(x.float())


def assert_matches(y, ref, dtype):
    atol, rtol = TOL[dtype]
    assert y.dtype == dtype and y.shape == ref.shape
    torch.testing.assert_close(y.float(), ref, atol=atol * ref.abs().max().item(), rtol=rtol)
