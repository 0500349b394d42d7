"""Type stub for the Cython extension built from csrc/_tiler.pyx (see its module docstring).

Every function validates its arguments and raises `fastgicn.errors.ConfigError` (a ValueError) naming the
shape, dtype or stride at fault, then runs its loop with the GIL released.
"""
import numpy as np
import numpy.typing as npt

def argb_to_rgb(src: npt.NDArray[np.uint32], out: npt.NDArray[np.uint8], threshold: int = 220) -> int:
    """Premultiplied ARGB (h, w) uint32 -> RGB on white in `out` (h, w, 3); returns the background count."""

def rgba_to_rgb(src: npt.NDArray[np.uint8], out: npt.NDArray[np.uint8], threshold: int = 220) -> int:
    """Straight-alpha RGBA (h, w, 4) -> RGB on white in `out` (h, w, 3); returns the background count."""

def rgb_to_rgb(src: npt.NDArray[np.uint8], out: npt.NDArray[np.uint8], threshold: int = 220) -> int:
    """Copy RGB (h, w, 3) into `out` (h, w, 3); returns the background count."""

def to_slot(src: npt.NDArray[np.uint32] | npt.NDArray[np.uint8], batch: npt.NDArray[np.uint8], slot: int,
            y0: int = 0, x0: int = 0, threshold: int = 220) -> int:
    """Write a tile (ARGB, RGBA or RGB) into batch[slot] at (y0, x0), pad the rest of the slot white;
    returns the background count over the whole slot, padding included."""

def white_fraction(rgb: npt.NDArray[np.uint8], threshold: int = 220) -> float:
    """Fraction of pixels with R, G and B all > threshold ((h, w, 3 or 4) uint8; 1.0 for an empty array)."""

def box_reduce(src: npt.NDArray[np.uint8], out: npt.NDArray[np.uint8], factor: int, threshold: int = 220) -> int:
    """factor x factor box mean (rounded half up) of RGB (h*f, w*f, 3) into `out` (h, w, 3); returns the
    background count of the output."""

def stitch_copy(band: npt.NDArray[np.uint8], tiles: npt.NDArray[np.uint8], boxes: npt.NDArray[np.int64]) -> None:
    """Copy boxes (rows ``tile, src_y, src_x, band_y, band_x, h, w``) of uint8 tiles (n, t, t) into the uint8
    band (rows, width)."""

def stitch_blend(acc: npt.NDArray[np.uint16], tiles: npt.NDArray[np.uint8], weights: npt.NDArray[np.uint16],
                 boxes: npt.NDArray[np.int64]) -> None:
    """acc += tile * weight (8.8 fixed point, weights <= 256) over boxes (rows ``tile, weight, src_y, src_x,
    band_y, band_x, h, w``)."""

def fixed_to_u8(acc: npt.NDArray[np.uint16], out: npt.NDArray[np.uint8]) -> None:
    """out = min((acc + 128) >> 8, 255) over the first out.shape[0] rows of acc."""

def band_shift(band: npt.NDArray, m: int) -> None:
    """Move rows m.. of a C-contiguous 2-D band up to row 0 and zero the last m rows."""

def uniform_u8(block: npt.NDArray[np.uint8]) -> int:
    """The value of a 2-D uint8 block whose pixels are all equal, else -1 (also when empty); stops at the first
    row that differs."""

def max_count_u8(rows: npt.NDArray[np.uint8], threshold: int = 128) -> tuple[int, int]:
    """(maximum, number of pixels >= threshold) of a 2-D uint8 array, one pass; (0, 0) when empty."""

def add_block_sums_u8(rows: npt.NDArray[np.uint8], factor: int, acc: npt.NDArray[np.uint64]) -> None:
    """acc[j] += the sum of rows[:, j*factor:(j+1)*factor] (the last block: the columns left); one pass."""

def area_reduce_u8(src: npt.NDArray[np.uint8], out: npt.NDArray[np.uint8], x0: npt.NDArray[np.int64],
                   wx: npt.NDArray[np.float64], y0: npt.NDArray[np.int64], wy: npt.NDArray[np.float64],
                   threshold: int = 220) -> int:
    """Separable weighted box sums of RGB `src` into `out` (the fractional area average); returns the
    background count of the output."""
