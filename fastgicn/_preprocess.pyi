"""Type stub for the Cython extension built from csrc/_preprocess.pyx (see its module docstring)."""
import numpy as np
import numpy.typing as npt

def nhwc_to_nchw_lut(src: npt.NDArray[np.uint8], lut: npt.NDArray[np.float32],
                     out: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """out[n, c, y, x] = lut[c, src[n, y, x, c]] (src N x H x W x 3 uint8, lut 3 x 256, out N x 3 x H x W)."""
