# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""uint8 NHWC pixels -> float32 NCHW model input in one pass, through a per-channel table of 256 values.

The table (`fastgicn.models.preprocess.Normalize.lut`) is the reference normalisation `(v / 255 - mean) / std`
evaluated by torch for every byte value v, so the result is bit-identical to the torch expression while the
pass costs one table load and one store per value (the torch expression makes four passes over float32
memory). The loop runs with the GIL released.
"""
import numpy as np

from libc.stdint cimport uint8_t

from fastgicn.errors import ConfigError


cdef void _rows(const uint8_t *src, const float *lut, float *dst, Py_ssize_t n, Py_ssize_t hw) noexcept nogil:
    cdef Py_ssize_t i, p
    cdef const uint8_t *s
    cdef float *d0
    cdef float *d1
    cdef float *d2
    cdef const float *l0 = lut
    cdef const float *l1 = lut + 256
    cdef const float *l2 = lut + 512
    for i in range(n):
        s = src + i * hw * 3
        d0 = dst + i * hw * 3
        d1 = d0 + hw
        d2 = d1 + hw
        for p in range(hw):
            d0[p] = l0[s[3 * p]]
            d1[p] = l1[s[3 * p + 1]]
            d2[p] = l2[s[3 * p + 2]]


def nhwc_to_nchw_lut(src, lut, out):
    """`out[n, c, y, x] = lut[c, src[n, y, x, c]]`: src (N, H, W, 3) uint8 C-contiguous, lut (3, 256) float32,
    out (N, 3, H, W) float32 C-contiguous (numpy arrays or anything exposing the buffer protocol)."""
    cdef const uint8_t[:, :, :, ::1] s = src
    cdef const float[:, ::1] t = lut
    cdef float[:, :, :, ::1] d = out
    if s.shape[3] != 3 or t.shape[0] != 3 or t.shape[1] != 256:
        raise ConfigError(f"nhwc_to_nchw_lut: src {tuple(s.shape)} must be N x H x W x 3 and lut "
                          f"{tuple(t.shape)} 3 x 256")
    if (d.shape[0], d.shape[1], d.shape[2], d.shape[3]) != (s.shape[0], 3, s.shape[1], s.shape[2]):
        raise ConfigError(f"nhwc_to_nchw_lut: out {tuple(d.shape)[:4]} must be {(s.shape[0], 3, s.shape[1], s.shape[2])}")
    if s.shape[0] == 0 or s.shape[1] == 0 or s.shape[2] == 0:
        return out
    with nogil:
        _rows(&s[0, 0, 0, 0], &t[0, 0], &d[0, 0, 0, 0], s.shape[0], s.shape[1] * s.shape[2])
    return out
