# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Pixel loops of the tiler: one pass over a tile converts it to uint8 RGB on white, counts background
pixels and writes the result into its slot of an NHWC batch.

Each public function validates its arguments in Python (raising `ConfigError`, a `ValueError`, with the
shape, dtype or stride at fault) and then runs its loop `nogil` on typed memoryviews, one row at a time
with plain pointers, so reader threads convert tiles in parallel.

Formats of `src`:
- ARGB: (h, w) uint32, premultiplied, native-endian words as `openslide_read_region` writes them
  (bytes B, G, R, A on little-endian). On white: channel + (255 - alpha), exact in integers.
- RGBA: (h, w, 4) uint8, straight (not premultiplied) alpha, as PIL and tifffile give it.
  On white: round((channel * alpha + 255 * (255 - alpha)) / 255).
- RGB: (h, w, 3) uint8, copied as is.

The background statistic is the number of pixels whose R, G and B (after compositing) are all greater
than `threshold`: the paper discards a tile only when every pixel is above 220 in every channel.

`src` may have any strides: rows are walked with their own stride (a crop of a larger image is not
copied); a copy is made only when pixels or channels are not packed, or when `src` overlaps `out`.
`out` must have packed pixels and channels (strides (any, 3, 1), e.g. `batch[i, y0:y1, x0:x1]` of a
C-contiguous NHWC batch) since it is written in place; anything else raises `ConfigError`.
"""
import numpy as np

from libc.stdint cimport uint8_t, uint32_t
from libc.stdlib cimport free, malloc
from libc.string cimport memset

from fastgicn.errors import ConfigError


# ---------------------------------------------------------------------------------------------------
# Row kernels: packed pixels in, packed RGB out, return the count of background pixels.
#
# Written in C (verbatim below) for two things Cython cannot say: `restrict` pointers, without which GCC
# must assume the uint8 output aliases the input and will not vectorise, and `target_clones`, which
# builds an AVX2 copy beside the baseline one and picks it at load time (about 4x faster per core on
# x86-64; the portable build is SSE2-only). Other compilers and platforms get the plain loops.

cdef extern from *:
    """
    #include <stdint.h>
    #include <stddef.h>
    #if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
    #define FG_CLONES __attribute__((target_clones("avx2", "default"), noinline))
    #else
    #define FG_CLONES
    #endif
    #if defined(__GNUC__) || defined(__clang__)
    #define FG_RESTRICT __restrict__
    #else
    #define FG_RESTRICT
    #endif

    /* Premultiplied ARGB words -> RGB on white: channel + (255 - alpha), exact. A premultiplied
       channel never exceeds alpha, so the sum is <= 255; the min() guards malformed words. */
    FG_CLONES static Py_ssize_t fg_row_argb(const uint32_t *FG_RESTRICT s, uint8_t *FG_RESTRICT d,
                                            Py_ssize_t w, uint32_t thr) {
        Py_ssize_t white = 0;
        for (Py_ssize_t x = 0; x < w; x++) {
            uint32_t p = s[x];
            uint32_t inv = 255u - (p >> 24);
            uint32_t r = ((p >> 16) & 255u) + inv, g = ((p >> 8) & 255u) + inv, b = (p & 255u) + inv;
            r = r < 255u ? r : 255u;
            g = g < 255u ? g : 255u;
            b = b < 255u ? b : 255u;
            d[3 * x] = (uint8_t)r;
            d[3 * x + 1] = (uint8_t)g;
            d[3 * x + 2] = (uint8_t)b;
            white += (r > thr) & (g > thr) & (b > thr);
        }
        return white;
    }

    /* Straight RGBA -> RGB on white: round((c * a + 255 * (255 - a)) / 255). The numerator plus 128
       is at most 65153, so 16-bit lanes hold it, and (v + (v >> 8)) >> 8 is the exact quotient for
       every v in that range (checked exhaustively in tests/test_tiler.py). */
    FG_CLONES static Py_ssize_t fg_row_rgba(const uint8_t *FG_RESTRICT s, uint8_t *FG_RESTRICT d,
                                            Py_ssize_t w, uint32_t thr) {
        Py_ssize_t white = 0;
        for (Py_ssize_t x = 0; x < w; x++) {
            uint16_t a = s[4 * x + 3];
            uint16_t bg = (uint16_t)(255u * (255u - a) + 128u);
            uint16_t r = (uint16_t)(s[4 * x] * a + bg);
            uint16_t g = (uint16_t)(s[4 * x + 1] * a + bg);
            uint16_t b = (uint16_t)(s[4 * x + 2] * a + bg);
            r = (uint16_t)(r + (r >> 8)) >> 8;
            g = (uint16_t)(g + (g >> 8)) >> 8;
            b = (uint16_t)(b + (b >> 8)) >> 8;
            d[3 * x] = (uint8_t)r;
            d[3 * x + 1] = (uint8_t)g;
            d[3 * x + 2] = (uint8_t)b;
            white += (r > thr) & (g > thr) & (b > thr);
        }
        return white;
    }

    /* RGB copied as is. */
    FG_CLONES static Py_ssize_t fg_row_rgb(const uint8_t *FG_RESTRICT s, uint8_t *FG_RESTRICT d,
                                           Py_ssize_t w, uint32_t thr) {
        Py_ssize_t white = 0;
        for (Py_ssize_t x = 0; x < 3 * w; x += 3) {
            uint8_t r = s[x], g = s[x + 1], b = s[x + 2];
            d[x] = r;
            d[x + 1] = g;
            d[x + 2] = b;
            white += (r > thr) & (g > thr) & (b > thr);
        }
        return white;
    }
    /* One output row of an f x f box mean: `s` points at the first of f source rows (`stride` bytes
       apart, packed RGB), `d` receives w pixels, rounded half up: (sum + f*f/2) / (f*f). `acc` holds
       3*w*f column sums. Returns the background count of the output row. */
    FG_CLONES static Py_ssize_t fg_box_row(const uint8_t *FG_RESTRICT s, Py_ssize_t stride, Py_ssize_t f,
                                           uint8_t *FG_RESTRICT d, Py_ssize_t w, uint32_t thr,
                                           uint32_t *FG_RESTRICT acc) {
        Py_ssize_t n = 3 * w * f, white = 0;
        for (Py_ssize_t i = 0; i < n; i++) acc[i] = s[i];
        for (Py_ssize_t r = 1; r < f; r++) {
            const uint8_t *row = s + r * stride;
            for (Py_ssize_t i = 0; i < n; i++) acc[i] += row[i];
        }
        uint32_t area = (uint32_t)(f * f), half = area / 2;
        for (Py_ssize_t x = 0; x < w; x++) {
            const uint32_t *a = acc + 3 * x * f;
            uint32_t rs = half, gs = half, bs = half;
            for (Py_ssize_t k = 0; k < f; k++) {
                rs += a[3 * k];
                gs += a[3 * k + 1];
                bs += a[3 * k + 2];
            }
            uint32_t r = rs / area, g = gs / area, b = bs / area;
            d[3 * x] = (uint8_t)r;
            d[3 * x + 1] = (uint8_t)g;
            d[3 * x + 2] = (uint8_t)b;
            white += (r > thr) & (g > thr) & (b > thr);
        }
        return white;
    }
    """
    Py_ssize_t _box_row "fg_box_row"(const uint8_t* s, Py_ssize_t stride, Py_ssize_t f, uint8_t* d, Py_ssize_t w,
                                     uint32_t thr, uint32_t* acc) nogil
    Py_ssize_t _row_argb "fg_row_argb"(const uint32_t* s, uint8_t* d, Py_ssize_t w, uint32_t thr) nogil
    Py_ssize_t _row_rgba "fg_row_rgba"(const uint8_t* s, uint8_t* d, Py_ssize_t w, uint32_t thr) nogil
    Py_ssize_t _row_rgb "fg_row_rgb"(const uint8_t* s, uint8_t* d, Py_ssize_t w, uint32_t thr) nogil


# ---------------------------------------------------------------------------------------------------
# Whole-tile loops over rows (row strides may be anything, including negative).

cdef Py_ssize_t _tile_argb(const uint32_t[:, :] src, uint8_t[:, :, :] out, uint32_t thr) noexcept nogil:
    cdef Py_ssize_t y, white = 0, w = src.shape[1]
    for y in range(src.shape[0]):
        white += _row_argb(&src[y, 0], &out[y, 0, 0], w, thr)
    return white


cdef Py_ssize_t _tile_rgba(const uint8_t[:, :, :] src, uint8_t[:, :, :] out, uint32_t thr) noexcept nogil:
    cdef Py_ssize_t y, white = 0, w = src.shape[1]
    for y in range(src.shape[0]):
        white += _row_rgba(&src[y, 0, 0], &out[y, 0, 0], w, thr)
    return white


cdef Py_ssize_t _tile_rgb(const uint8_t[:, :, :] src, uint8_t[:, :, :] out, uint32_t thr) noexcept nogil:
    cdef Py_ssize_t y, white = 0, w = src.shape[1]
    for y in range(src.shape[0]):
        white += _row_rgb(&src[y, 0, 0], &out[y, 0, 0], w, thr)
    return white


cdef void _fill_white(uint8_t[:, :, :] out) noexcept nogil:
    cdef Py_ssize_t y, w = out.shape[1]
    if w == 0:
        return
    for y in range(out.shape[0]):
        memset(&out[y, 0, 0], 255, 3 * w)


# ---------------------------------------------------------------------------------------------------
# Validation (Python) and dispatch.

cdef int _check_threshold(threshold) except -1:
    if isinstance(threshold, (bool, np.bool_)) or not isinstance(threshold, (int, np.integer)):
        raise ConfigError(f"threshold={threshold!r}: use an integer in 0..255 (the paper uses 220)")
    if not 0 <= threshold <= 255:
        raise ConfigError(f"threshold={threshold!r}: use an integer in 0..255 (the paper uses 220)")
    return <int>threshold


cdef _check_out(out, Py_ssize_t h, Py_ssize_t w):
    if not isinstance(out, np.ndarray):
        raise ConfigError(f"out must be a numpy uint8 array of shape ({h}, {w}, 3), got {type(out).__name__}")
    if out.dtype != np.uint8 or out.ndim != 3 or out.shape[2] != 3:
        raise ConfigError(f"out must be uint8 of shape (h, w, 3), got {out.dtype} {out.shape}")
    if out.shape[0] != h or out.shape[1] != w:
        raise ConfigError(f"out has shape {out.shape} but the source is {h} x {w}: pass a matching slice "
                          "such as batch[slot, y0:y0 + h, x0:x0 + w]")
    if not out.flags.writeable:
        raise ConfigError("out is read-only: pass a writeable array")
    if (w > 1 and out.strides[1] != 3) or out.strides[2] != 1:
        raise ConfigError(f"out has strides {out.strides}: pixels and channels must be packed (strides "
                          "(any, 3, 1)), e.g. a row range and column range of a C-contiguous NHWC batch")
    return out


def _describe(a):
    return f"{a.dtype} {a.shape}" if isinstance(a, np.ndarray) else type(a).__name__


def _as_argb(src):
    if not isinstance(src, np.ndarray) or src.dtype != np.uint32 or src.ndim != 2:
        raise ConfigError(f"ARGB source must be a uint32 array of shape (h, w), got {_describe(src)}")
    if src.shape[1] > 1 and src.strides[1] != 4:
        src = np.ascontiguousarray(src)
    return src


def _as_u8(src, Py_ssize_t channels, str name):
    if (not isinstance(src, np.ndarray) or src.dtype != np.uint8 or src.ndim != 3
            or src.shape[2] != channels):
        raise ConfigError(f"{name} source must be a uint8 array of shape (h, w, {channels}), "
                          f"got {_describe(src)}")
    if src.strides[2] != 1 or (src.shape[1] > 1 and src.strides[1] != channels):
        src = np.ascontiguousarray(src)
    return src


def _unaliased(src, out):
    # the row kernels promise the compiler that input and output never overlap (`restrict`)
    return src.copy() if np.may_share_memory(src, out) else src


def argb_to_rgb(src, out, threshold=220):
    """Premultiplied ARGB words (h, w) uint32 -> RGB on white in `out` (h, w, 3) uint8.

    Returns the number of pixels whose R, G and B are all > `threshold`.
    """
    cdef uint32_t thr = _check_threshold(threshold)
    src = _as_argb(src)
    _check_out(out, src.shape[0], src.shape[1])
    src = _unaliased(src, out)
    if src.size == 0:
        return 0
    cdef const uint32_t[:, :] s = src
    cdef uint8_t[:, :, :] o = out
    cdef Py_ssize_t white
    with nogil:
        white = _tile_argb(s, o, thr)
    return white


def rgba_to_rgb(src, out, threshold=220):
    """Straight-alpha RGBA (h, w, 4) uint8 -> RGB on white in `out` (h, w, 3) uint8.

    Returns the number of pixels whose R, G and B are all > `threshold`.
    """
    cdef uint32_t thr = _check_threshold(threshold)
    src = _as_u8(src, 4, "RGBA")
    _check_out(out, src.shape[0], src.shape[1])
    src = _unaliased(src, out)
    if src.size == 0:
        return 0
    cdef const uint8_t[:, :, :] s = src
    cdef uint8_t[:, :, :] o = out
    cdef Py_ssize_t white
    with nogil:
        white = _tile_rgba(s, o, thr)
    return white


def rgb_to_rgb(src, out, threshold=220):
    """Copy RGB (h, w, 3) uint8 into `out` (h, w, 3) uint8 and count background pixels.

    Returns the number of pixels whose R, G and B are all > `threshold`.
    """
    cdef uint32_t thr = _check_threshold(threshold)
    src = _as_u8(src, 3, "RGB")
    _check_out(out, src.shape[0], src.shape[1])
    src = _unaliased(src, out)
    if src.size == 0:
        return 0
    cdef const uint8_t[:, :, :] s = src
    cdef uint8_t[:, :, :] o = out
    cdef Py_ssize_t white
    with nogil:
        white = _tile_rgb(s, o, thr)
    return white


def to_slot(src, batch, Py_ssize_t slot, Py_ssize_t y0=0, Py_ssize_t x0=0, threshold=220):
    """Write one tile into `batch[slot]` (NHWC uint8) at rows y0.., columns x0.., the rest white.

    `src` is ARGB (h, w) uint32, RGBA (h, w, 4) uint8 or RGB (h, w, 3) uint8 (see the module doc);
    it must fit inside the slot at (y0, x0). Everything in the slot outside that rectangle is set to
    255 (white), as an edge tile is padded. Returns the number of background pixels (R, G and B all
    > `threshold`) in the whole slot, padding included.
    """
    cdef uint32_t thr = _check_threshold(threshold)
    if (not isinstance(batch, np.ndarray) or batch.dtype != np.uint8 or batch.ndim != 4
            or batch.shape[3] != 3):
        raise ConfigError(f"batch must be a uint8 NHWC array (n, h, w, 3), got {_describe(batch)}")
    if not 0 <= slot < batch.shape[0]:
        raise ConfigError(f"slot={slot} is outside the batch of {batch.shape[0]}")
    cdef int kind
    if isinstance(src, np.ndarray) and src.dtype == np.uint32:
        src = _as_argb(src)
        kind = 0
    elif isinstance(src, np.ndarray) and src.dtype == np.uint8 and src.ndim == 3 and src.shape[2] == 4:
        src = _as_u8(src, 4, "RGBA")
        kind = 1
    elif isinstance(src, np.ndarray) and src.dtype == np.uint8 and src.ndim == 3 and src.shape[2] == 3:
        src = _as_u8(src, 3, "RGB")
        kind = 2
    else:
        raise ConfigError("tile must be ARGB (h, w) uint32, RGBA (h, w, 4) uint8 or RGB (h, w, 3) uint8, "
                          f"got {_describe(src)}")
    cdef Py_ssize_t h = src.shape[0], w = src.shape[1], th = batch.shape[1], tw = batch.shape[2]
    if y0 < 0 or x0 < 0 or y0 + h > th or x0 + w > tw:
        raise ConfigError(f"a {h} x {w} tile at (y0={y0}, x0={x0}) does not fit in a {th} x {tw} slot")
    slot_view = batch[slot]
    _check_out(slot_view, th, tw)
    src = _unaliased(src, slot_view)
    cdef uint8_t[:, :, :] o = slot_view
    cdef const uint32_t[:, :] s32
    cdef const uint8_t[:, :, :] s8
    cdef Py_ssize_t white = 0
    if h and w:
        if kind == 0:
            s32 = src
        else:
            s8 = src
    with nogil:
        # padding: bands above and below, then the columns left and right of the tile
        _fill_white(o[:y0])
        _fill_white(o[y0 + h:])
        _fill_white(o[y0:y0 + h, :x0])
        _fill_white(o[y0:y0 + h, x0 + w:])
        if h and w:
            if kind == 0:
                white = _tile_argb(s32, o[y0:y0 + h, x0:x0 + w], thr)
            elif kind == 1:
                white = _tile_rgba(s8, o[y0:y0 + h, x0:x0 + w], thr)
            else:
                white = _tile_rgb(s8, o[y0:y0 + h, x0:x0 + w], thr)
    return white + (th * tw - h * w)


def white_fraction(rgb, threshold=220):
    """Fraction of pixels whose R, G and B are all above `threshold` (a 4th channel is ignored)."""
    cdef uint32_t thr = _check_threshold(threshold)
    if not isinstance(rgb, np.ndarray) or rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] < 3:
        raise ConfigError(f"white_fraction needs a uint8 (h, w, 3 or 4) array, got {_describe(rgb)}")
    cdef const uint8_t[:, :, :] v = rgb
    cdef Py_ssize_t y, x, h = v.shape[0], w = v.shape[1], count = 0
    with nogil:
        for y in range(h):
            for x in range(w):
                count += (v[y, x, 0] > thr) & (v[y, x, 1] > thr) & (v[y, x, 2] > thr)
    return count / <double>(h * w) if h * w else 1.0


def box_reduce(src, out, Py_ssize_t factor, threshold=220):
    """`factor` x `factor` box mean of RGB `src` (h * factor, w * factor, 3) uint8 into `out` (h, w, 3) uint8,
    rounded half up, as the area average of an exact integer downsample. Rows of `src` may have any
    stride. Returns the number of output pixels whose R, G and B are all > `threshold`."""
    cdef uint32_t thr = _check_threshold(threshold)
    if factor < 1 or factor > 64:
        raise ConfigError(f"factor={factor}: use an integer reduction in 1..64")
    src = _as_u8(src, 3, "RGB")
    if src.shape[0] % factor or src.shape[1] % factor:
        raise ConfigError(f"source {src.shape[0]} x {src.shape[1]} is not a multiple of factor {factor}")
    cdef Py_ssize_t h = src.shape[0] // factor, w = src.shape[1] // factor
    _check_out(out, h, w)
    src = _unaliased(src, out)
    if h == 0 or w == 0:
        return 0
    if src.strides[0] < 0:
        src = np.ascontiguousarray(src)
    cdef const uint8_t[:, :, :] s = src
    cdef uint8_t[:, :, :] o = out
    cdef Py_ssize_t y, white = 0, stride = src.strides[0]
    cdef uint32_t *acc = <uint32_t *> malloc(3 * w * factor * sizeof(uint32_t))
    if acc == NULL:
        raise MemoryError()
    try:
        with nogil:
            for y in range(h):
                white += _box_row(&s[y * factor, 0, 0], stride, factor, &o[y, 0, 0], w, thr, acc)
    finally:
        free(acc)
    return white


# ---------------------------------------------------------------------------------------------------
# Stitcher loops (fastgicn/slide/stitch.py): place a batch of uint8 tile predictions into the band of
# rows still open, as plain copies (crop, or blend without overlap) or as 8.8 fixed-point weighted sums
# (blend), and turn finished sums back into uint8. Boxes are checked in Python once per call, then every
# tile of the batch is done in one `nogil` loop of row kernels.

from libc.stdint cimport uint16_t, int64_t, uint64_t
from libc.string cimport memcpy, memmove

cdef extern from *:
    """
    /* acc += p * w: p uint8, w 8.8 fixed point (<= 256); the sums of a partition of unity stay <= 65280. */
    FG_CLONES static void fg_blend_row(uint16_t *FG_RESTRICT acc, const uint8_t *FG_RESTRICT p,
                                       const uint16_t *FG_RESTRICT w, Py_ssize_t n) {
        for (Py_ssize_t i = 0; i < n; i++) acc[i] = (uint16_t)(acc[i] + (uint16_t)(p[i] * w[i]));
    }
    /* 8.8 fixed point -> uint8, rounded half up, clamped to 255. */
    FG_CLONES static void fg_fixed_row(const uint16_t *FG_RESTRICT acc, uint8_t *FG_RESTRICT out,
                                       Py_ssize_t n) {
        for (Py_ssize_t i = 0; i < n; i++) {
            uint32_t v = ((uint32_t)acc[i] + 128u) >> 8;
            out[i] = (uint8_t)(v > 255u ? 255u : v);
        }
    }
    """
    void fg_blend_row(uint16_t *acc, const uint8_t *p, const uint16_t *w, Py_ssize_t n) noexcept nogil
    void fg_fixed_row(const uint16_t *acc, uint8_t *out, Py_ssize_t n) noexcept nogil


def _check_boxes(boxes, Py_ssize_t ncols, Py_ssize_t n_tiles, Py_ssize_t t_h, Py_ssize_t t_w,
                 Py_ssize_t b_h, Py_ssize_t b_w, Py_ssize_t n_weights=0):
    boxes = np.ascontiguousarray(boxes, dtype=np.int64)
    if boxes.ndim != 2 or boxes.shape[1] != ncols:
        raise ConfigError(f"boxes must be (n, {ncols}) int64, got {_describe(boxes)}")
    if boxes.shape[0] == 0:
        return boxes
    j = boxes[:, 0]
    sy, sx, by, bx, h, w = (boxes[:, ncols - 6 + k] for k in range(6))
    bad = ((j < 0) | (j >= n_tiles) | (h < 0) | (w < 0) | (sy < 0) | (sx < 0) | (sy + h > t_h) | (sx + w > t_w)
           | (by < 0) | (bx < 0) | (by + h > b_h) | (bx + w > b_w))
    if ncols == 8:
        bad |= (boxes[:, 1] < 0) | (boxes[:, 1] >= n_weights)
    if bad.any():
        k = int(np.flatnonzero(bad)[0])
        raise ConfigError(f"box {k} {boxes[k].tolist()} falls outside its tile ({n_tiles} of {t_h} x {t_w}) "
                          f"or the band ({b_h} x {b_w})")
    return boxes


def stitch_copy(band, tiles, boxes):
    """Copy boxes of uint8 `tiles` (n, t, t) into the uint8 `band` (rows, width), C-contiguous both. Each
    row of `boxes` (int64) is ``tile, src_y, src_x, band_y, band_x, h, w``."""
    if not (isinstance(band, np.ndarray) and band.dtype == np.uint8 and band.ndim == 2
            and band.flags.c_contiguous and band.flags.writeable):
        raise ConfigError(f"band must be a writable C-contiguous (rows, width) uint8 array, got {_describe(band)}")
    tiles = np.ascontiguousarray(tiles)
    if tiles.dtype != np.uint8 or tiles.ndim != 3:
        raise ConfigError(f"tiles must be (n, t, t) uint8, got {_describe(tiles)}")
    boxes = _check_boxes(boxes, 7, tiles.shape[0], tiles.shape[1], tiles.shape[2], band.shape[0], band.shape[1])
    cdef Py_ssize_t nb = boxes.shape[0], k, r
    if nb == 0:
        return
    cdef uint8_t[:, ::1] b = band
    cdef const uint8_t[:, :, ::1] t = tiles
    cdef const int64_t[:, ::1] bx = boxes
    with nogil:
        for k in range(nb):
            if bx[k, 6] == 0:
                continue
            for r in range(bx[k, 5]):
                memcpy(&b[bx[k, 3] + r, bx[k, 4]], &t[bx[k, 0], bx[k, 1] + r, bx[k, 2]], bx[k, 6])


def stitch_blend(acc, tiles, weights, boxes):
    """acc += tile * weight over boxes: `acc` (rows, width) uint16 8.8 fixed-point sums, `tiles` (n, t, t)
    uint8, `weights` (k, t, t) uint16 (256 is 1); each row of `boxes` (int64) is
    ``tile, weight, src_y, src_x, band_y, band_x, h, w`` (the weight tile is read at the source position).
    Weights must be <= 256 and sum to at most 256 over the tiles covering a pixel (the caller's partition of
    unity; not checked per call, it would cost more than the loop): sums stay below 65536."""
    if not (isinstance(acc, np.ndarray) and acc.dtype == np.uint16 and acc.ndim == 2
            and acc.flags.c_contiguous and acc.flags.writeable):
        raise ConfigError(f"acc must be a writable C-contiguous (rows, width) uint16 array, got {_describe(acc)}")
    tiles = np.ascontiguousarray(tiles)
    if tiles.dtype != np.uint8 or tiles.ndim != 3:
        raise ConfigError(f"tiles must be (n, t, t) uint8, got {_describe(tiles)}")
    weights = np.ascontiguousarray(weights)
    if weights.dtype != np.uint16 or weights.ndim != 3 or weights.shape[1:] != tiles.shape[1:]:
        raise ConfigError(f"weights must be (k, {tiles.shape[1]}, {tiles.shape[2]}) uint16, got "
                          f"{_describe(weights)}")
    boxes = _check_boxes(boxes, 8, tiles.shape[0], tiles.shape[1], tiles.shape[2], acc.shape[0], acc.shape[1],
                         weights.shape[0])
    cdef Py_ssize_t nb = boxes.shape[0], k, r, sy, sx
    if nb == 0:
        return
    cdef uint16_t[:, ::1] a = acc
    cdef const uint8_t[:, :, ::1] t = tiles
    cdef const uint16_t[:, :, ::1] wt = weights
    cdef const int64_t[:, ::1] bx = boxes
    with nogil:
        for k in range(nb):
            if bx[k, 7] == 0:
                continue
            for r in range(bx[k, 6]):
                sy = bx[k, 2] + r
                sx = bx[k, 3]
                fg_blend_row(&a[bx[k, 4] + r, bx[k, 5]], &t[bx[k, 0], sy, sx], &wt[bx[k, 1], sy, sx], bx[k, 7])


def fixed_to_u8(acc, out):
    """`out` (h, w) uint8 = min((acc + 128) >> 8, 255) of the first h rows of `acc` (rows >= h, w) uint16."""
    if not (isinstance(acc, np.ndarray) and acc.dtype == np.uint16 and acc.ndim == 2 and acc.flags.c_contiguous):
        raise ConfigError(f"acc must be a C-contiguous (rows, width) uint16 array, got {_describe(acc)}")
    if not (isinstance(out, np.ndarray) and out.dtype == np.uint8 and out.ndim == 2 and out.flags.c_contiguous
            and out.flags.writeable and out.shape[0] <= acc.shape[0] and out.shape[1] == acc.shape[1]):
        raise ConfigError(f"out must be a writable C-contiguous (h <= {acc.shape[0]}, {acc.shape[1]}) uint8 "
                          f"array, got {_describe(out)}")
    cdef Py_ssize_t h = out.shape[0], w = out.shape[1], r
    if h == 0 or w == 0:
        return
    cdef const uint16_t[:, ::1] a = acc
    cdef uint8_t[:, ::1] o = out
    with nogil:
        for r in range(h):
            fg_fixed_row(&a[r, 0], &o[r, 0], w)


def band_shift(band, Py_ssize_t m):
    """Move rows m.. of the C-contiguous 2-D `band` (any dtype) up to row 0 and zero the last m rows."""
    if not (isinstance(band, np.ndarray) and band.ndim == 2 and band.flags.c_contiguous and band.flags.writeable):
        raise ConfigError(f"band must be a writable C-contiguous 2-D array, got {_describe(band)}")
    cdef Py_ssize_t rows = band.shape[0]
    if m < 0 or m > rows:
        raise ConfigError(f"shift by {m} rows: use 0..{rows}")
    if m == 0 or band.size == 0:
        return
    cdef uint8_t[:, ::1] raw = band.view(np.uint8).reshape(rows, -1)
    cdef Py_ssize_t row_bytes = raw.shape[1]
    with nogil:
        if m < rows:
            memmove(&raw[0, 0], &raw[m, 0], (rows - m) * row_bytes)
        memset(&raw[rows - m, 0], 0, m * row_bytes)


# ---------------------------------------------------------------------------------------------------
# Statistics of single-channel uint8 maps for the writers: is a tile uniform, what is a band's maximum
# and how many of its pixels reach a threshold. One pass each, the GIL released, rows walked with their
# own stride (a tile cut from a band is not copied).

cdef extern from *:
    """
    #include <stdint.h>
    #include <stddef.h>
    #if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
    #define FG_CLONES2 __attribute__((target_clones("avx2", "default"), noinline))
    #else
    #define FG_CLONES2
    #endif
    /* OR of (pixel ^ v) over a packed row: 0 exactly when every pixel equals v. */
    FG_CLONES2 static uint8_t fg_row_diff(const uint8_t *s, Py_ssize_t w, uint8_t v) {
        uint8_t acc = 0;
        for (Py_ssize_t x = 0; x < w; x++) acc |= (uint8_t)(s[x] ^ v);
        return acc;
    }
    /* max of a packed row, and the count of pixels >= thr added to *count */
    FG_CLONES2 static uint8_t fg_row_max_count(const uint8_t *s, Py_ssize_t w, uint8_t thr, Py_ssize_t *count) {
        uint8_t m = 0;
        Py_ssize_t c = 0;
        for (Py_ssize_t x = 0; x < w; x++) {
            uint8_t p = s[x];
            m = p > m ? p : m;
            c += p >= thr;
        }
        *count += c;
        return m;
    }
    """
    uint8_t _row_diff "fg_row_diff"(const uint8_t* s, Py_ssize_t w, uint8_t v) nogil
    uint8_t _row_max_count "fg_row_max_count"(const uint8_t* s, Py_ssize_t w, uint8_t thr, Py_ssize_t* count) nogil


cdef extern from "numpy/arrayobject.h":
    # the raw data pointer and strides of an ndarray, without building a typed memoryview (which costs
    # microseconds per call: these functions run once per TIFF tile)
    ctypedef struct PyArrayObject:
        pass
    void* PyArray_DATA(PyArrayObject* arr) nogil
    Py_ssize_t* PyArray_STRIDES(PyArrayObject* arr) nogil
    Py_ssize_t* PyArray_DIMS(PyArrayObject* arr) nogil


cdef _u8_rows(a, str name):
    """`a` as a 2-D uint8 ndarray whose rows are packed (a copy only when they are not)."""
    if type(a) is not np.ndarray:
        a = np.asarray(a)
    if a.dtype != np.uint8 or a.ndim != 2:
        raise ConfigError(f"{name}: expected a 2-D uint8 array, got {_describe(a)}")
    if a.strides[1] != 1 and a.shape[1] > 1:
        a = np.ascontiguousarray(a)
    return a


def uniform_u8(block):
    """The value of a 2-D uint8 block whose pixels are all equal, else -1 (also for an empty block).
    Stops at the first row that differs."""
    arr = _u8_rows(block, "uniform_u8")
    cdef PyArrayObject* a = <PyArrayObject*>arr
    cdef Py_ssize_t h = PyArray_DIMS(a)[0], w = PyArray_DIMS(a)[1], stride = PyArray_STRIDES(a)[0], y
    if h == 0 or w == 0:
        return -1
    cdef const uint8_t* p = <const uint8_t*>PyArray_DATA(a)
    cdef uint8_t first = p[0]
    cdef int same = 1
    with nogil:
        for y in range(h):
            if _row_diff(p + y * stride, w, first):
                same = 0
                break
    return <int>first if same else -1


def max_count_u8(rows, threshold=128):
    """(maximum, number of pixels >= threshold) of a 2-D uint8 array in one pass ((0, 0) when empty)."""
    arr = _u8_rows(rows, "max_count_u8")
    cdef uint32_t thr = _check_threshold(threshold)
    cdef PyArrayObject* a = <PyArrayObject*>arr
    cdef Py_ssize_t h = PyArray_DIMS(a)[0], w = PyArray_DIMS(a)[1], stride = PyArray_STRIDES(a)[0], y
    cdef Py_ssize_t count = 0
    cdef uint8_t m = 0, r
    if h == 0 or w == 0:
        return 0, 0
    cdef const uint8_t* p = <const uint8_t*>PyArray_DATA(a)
    with nogil:
        for y in range(h):
            r = _row_max_count(p + y * stride, w, <uint8_t>thr, &count)
            if r > m:
                m = r
    return int(m), int(count)


def add_block_sums_u8(rows, Py_ssize_t factor, acc):
    """acc[j] += the sum of rows[:, j*factor:(j+1)*factor] (the last block: the columns left) for 2-D uint8 `rows`
    and a uint64 `acc` of ceil(width / factor) blocks; one pass, the GIL released (LowRes's block means)."""
    arr = _u8_rows(rows, "add_block_sums_u8")
    if factor < 1:
        raise ConfigError(f"add_block_sums_u8: factor={factor}: use an integer >= 1")
    cdef PyArrayObject* a = <PyArrayObject*>arr
    cdef Py_ssize_t h = PyArray_DIMS(a)[0], w = PyArray_DIMS(a)[1], stride = PyArray_STRIDES(a)[0]
    cdef Py_ssize_t blocks = (w + factor - 1) // factor
    if not (isinstance(acc, np.ndarray) and acc.dtype == np.uint64 and acc.ndim == 1 and acc.shape[0] == blocks
            and acc.flags.c_contiguous and acc.flags.writeable):
        raise ConfigError(f"add_block_sums_u8: acc must be a writable uint64 array of {blocks} blocks, "
                          f"got {_describe(acc)}")
    cdef uint64_t[::1] out = acc
    cdef Py_ssize_t y, j, x, x1
    cdef uint64_t s
    cdef const uint8_t* row
    if h == 0 or w == 0:
        return
    cdef const uint8_t* p = <const uint8_t*>PyArray_DATA(a)
    with nogil:
        for y in range(h):
            row = p + y * stride
            for j in range(blocks):
                x1 = (j + 1) * factor
                if x1 > w:
                    x1 = w
                s = 0
                for x in range(j * factor, x1):
                    s += row[x]
                out[j] += s


# ---------------------------------------------------------------------------------------------------
# Area average for fractional reduction factors (slide/resolution.py `area_reduce`): each output pixel is the
# mean of the source over a box with fractional edges, a source pixel weighted by the fraction it covers.
# Separable: per output row, the <= k source rows it touches are reduced along x with the column weights, then
# combined with the row weights; float64 throughout, rounded half up.

cdef extern from *:
    """
    #include <math.h>
    static Py_ssize_t fg_area_reduce(const uint8_t *src, Py_ssize_t sstride, Py_ssize_t sh, Py_ssize_t sw,
                                     uint8_t *dst, Py_ssize_t dstride, Py_ssize_t h, Py_ssize_t w,
                                     const int64_t *x0, const double *wx, const int64_t *y0, const double *wy,
                                     Py_ssize_t k, uint32_t thr, double *rows) {
        Py_ssize_t white = 0;
        for (Py_ssize_t i = 0; i < h; i++) {
            for (Py_ssize_t a = 0; a < k; a++) {
                double *acc = rows + a * 3 * w;
                Py_ssize_t y = y0[i] + a;
                if (wy[i * k + a] == 0.0 || y >= sh) {
                    for (Py_ssize_t j = 0; j < 3 * w; j++) acc[j] = 0.0;
                    continue;
                }
                const uint8_t *row = src + y * sstride;
                for (Py_ssize_t j = 0; j < w; j++) {
                    double r = 0.0, g = 0.0, b = 0.0;
                    for (Py_ssize_t c = 0; c < k; c++) {
                        double wt = wx[j * k + c];
                        Py_ssize_t x = x0[j] + c;
                        if (wt == 0.0 || x >= sw) continue;
                        const uint8_t *p = row + 3 * x;
                        r += wt * p[0]; g += wt * p[1]; b += wt * p[2];
                    }
                    acc[3 * j] = r; acc[3 * j + 1] = g; acc[3 * j + 2] = b;
                }
            }
            uint8_t *out = dst + i * dstride;
            for (Py_ssize_t j = 0; j < w; j++) {
                double v[3] = {0.0, 0.0, 0.0};
                for (Py_ssize_t a = 0; a < k; a++) {
                    double wt = wy[i * k + a];
                    const double *acc = rows + a * 3 * w + 3 * j;
                    v[0] += wt * acc[0]; v[1] += wt * acc[1]; v[2] += wt * acc[2];
                }
                uint32_t q[3];
                for (int ch = 0; ch < 3; ch++) {
                    double f = floor(v[ch] + 0.5);
                    q[ch] = f < 0.0 ? 0u : (f > 255.0 ? 255u : (uint32_t)f);
                    out[3 * j + ch] = (uint8_t)q[ch];
                }
                white += (q[0] > thr) & (q[1] > thr) & (q[2] > thr);
            }
        }
        return white;
    }
    """
    Py_ssize_t _area_reduce "fg_area_reduce"(const uint8_t* src, Py_ssize_t sstride, Py_ssize_t sh, Py_ssize_t sw,
                                             uint8_t* dst, Py_ssize_t dstride, Py_ssize_t h, Py_ssize_t w,
                                             const int64_t* x0, const double* wx, const int64_t* y0,
                                             const double* wy, Py_ssize_t k, uint32_t thr, double* rows) nogil


def area_reduce_u8(src, out, x0, wx, y0, wy, threshold=220):
    """Separable weighted box sums of RGB `src` into `out` (h, w, 3): output (i, j) = sum over a, c of
    wy[i, a] * wx[j, c] * src[y0[i] + a, x0[j] + c], rounded half up and clipped (indices past the source
    count as 0 weight). `x0`/`y0` int64 (w,)/(h,), `wx`/`wy` float64 (w, k)/(h, k). Returns the background
    count of the output."""
    cdef uint32_t thr = _check_threshold(threshold)
    src = _as_u8(src, 3, "RGB")
    if src.strides[0] < 0:
        src = np.ascontiguousarray(src)
    if not isinstance(out, np.ndarray) or out.ndim != 3:
        raise ConfigError(f"area_reduce_u8: out must be a uint8 (h, w, 3) array, got {_describe(out)}")
    cdef Py_ssize_t h = out.shape[0], w = out.shape[1]
    _check_out(out, h, w)
    x0 = np.ascontiguousarray(x0, np.int64)
    y0 = np.ascontiguousarray(y0, np.int64)
    wx = np.ascontiguousarray(wx, np.float64)
    wy = np.ascontiguousarray(wy, np.float64)
    if x0.shape != (w,) or y0.shape != (h,) or wx.ndim != 2 or wx.shape[0] != w or wy.shape != (h, wx.shape[1]):
        raise ConfigError(f"area_reduce_u8: weights {wx.shape}/{wy.shape} and starts {x0.shape}/{y0.shape} do not "
                          f"match an output of {h} x {w}")
    if (x0.size and x0.min() < 0) or (y0.size and y0.min() < 0):
        raise ConfigError("area_reduce_u8: source starts must be >= 0")
    if h == 0 or w == 0:
        return 0
    cdef Py_ssize_t k = wx.shape[1]
    cdef const uint8_t[:, :, :] s = src
    cdef uint8_t[:, :, :] o = out
    cdef const int64_t[:] vx0 = x0
    cdef const int64_t[:] vy0 = y0
    cdef const double[:, :] vwx = wx
    cdef const double[:, :] vwy = wy
    cdef Py_ssize_t white, sh = src.shape[0], sw = src.shape[1], sstride = src.strides[0], dstride = out.strides[0]
    cdef double *rows = <double *> malloc(k * 3 * w * sizeof(double))
    if rows == NULL:
        raise MemoryError()
    try:
        with nogil:
            white = _area_reduce(&s[0, 0, 0], sstride, sh, sw, &o[0, 0, 0], dstride, h, w, &vx0[0], &vwx[0, 0],
                                 &vy0[0], &vwy[0, 0], k, thr, rows)
    finally:
        free(rows)
    return white
