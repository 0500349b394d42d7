"""Shared test setup. Keep it small: each test file makes its own fixtures."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    # Without a GPU the Triton kernels run under the interpreter on CPU tensors. Triton decides this when the
    # kernels are decorated, i.e. at the first import of fastgicn.kernels, so it must be set before any test
    # module imports them.
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a module's tests (use with `pytestmark = pytest.mark.usefixtures(...)`): on
    cores shared with other jobs torch's OpenMP threads stall (30x slower seen on a busy 2-core machine);
    no result depends on it. Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def no_tf32():
    """On a GPU make cuDNN true fp32 (no TF32), so references for fp32 kernels keep tight tolerances."""
    old = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = old
