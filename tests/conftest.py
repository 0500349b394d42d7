"""Shared test setup. Keep it small: each test file makes its own fixtures."""
import os

import torch

if not torch.cuda.is_available():
    # Without a GPU the Triton kernels run under the interpreter on CPU tensors. Triton decides this when the
    # kernels are decorated, i.e. at the first import of fastgicn.kernels, so it must be set before any test
    # module imports them.
    os.environ.setdefault("TRITON_INTERPRET", "1")
