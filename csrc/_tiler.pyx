# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Pixel loops of the tiler. Python validates shapes and dtypes; these run nogil on typed memoryviews."""
import numpy as np


def white_fraction(const unsigned char[:, :, :] rgba, int threshold):
    """Fraction of pixels whose R, G and B are all above `threshold` (alpha ignored)."""
    cdef Py_ssize_t y, x, h = rgba.shape[0], w = rgba.shape[1]
    cdef Py_ssize_t count = 0
    with nogil:
        for y in range(h):
            for x in range(w):
                if rgba[y, x, 0] > threshold and rgba[y, x, 1] > threshold and rgba[y, x, 2] > threshold:
                    count += 1
    return count / <double>(h * w) if h * w else 1.0
