"""The Cython tiler loops against straightforward NumPy references (also used by bench/bench_tiler.py)."""
from __future__ import annotations

import sys
import threading

import numpy as np
import pytest

from fastgicn import _tiler
from fastgicn.errors import ConfigError

# ---------------------------------------------------------------------------------------------------
# NumPy references. ARGB is decoded through the bytes of the words in memory (B, G, R, A on a
# little-endian machine), not through shifts as the kernel does, so byte order is checked too.


def ref_argb(src: np.ndarray, threshold: int) -> tuple[np.ndarray, int]:
    b = np.ascontiguousarray(src).view(np.uint8).reshape(*src.shape, 4).astype(np.int32)
    if sys.byteorder == "big":
        b = b[..., ::-1]
    bgr, a = b[..., :3], b[..., 3:]
    rgb = np.minimum(bgr[..., ::-1] + (255 - a), 255).astype(np.uint8)
    return rgb, int(np.all(rgb > threshold, axis=-1).sum())


def ref_rgba(src: np.ndarray, threshold: int) -> tuple[np.ndarray, int]:
    c = src[..., :3].astype(np.float64)
    a = src[..., 3:].astype(np.float64) / 255.0
    rgb = np.rint(c * a + 255.0 * (1.0 - a)).astype(np.uint8)
    return rgb, int(np.all(rgb > threshold, axis=-1).sum())


def ref_rgb(src: np.ndarray, threshold: int) -> tuple[np.ndarray, int]:
    rgb = np.array(src, dtype=np.uint8)
    return rgb, int(np.all(rgb > threshold, axis=-1).sum())


def pack_argb(rgb: np.ndarray, a: np.ndarray) -> np.ndarray:
    """Premultiplied words from straight colour and alpha, through bytes (independent of the kernel)."""
    prem = np.rint(rgb.astype(np.float64) * a[..., None] / 255.0).astype(np.uint8)
    b = np.concatenate([prem[..., ::-1], a[..., None].astype(np.uint8)], axis=-1)
    if sys.byteorder == "big":
        b = b[..., ::-1]
    return np.ascontiguousarray(b).view(np.uint32).reshape(rgb.shape[:2])


def random_argb(rng, h, w, alpha="mixed"):
    rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    if alpha == "opaque":
        a = np.full((h, w), 255, np.uint8)
    elif alpha == "zero":
        a = np.zeros((h, w), np.uint8)
    else:
        a = rng.choice(np.array([0, 1, 128, 254, 255], np.uint8), (h, w))
        a[rng.random((h, w)) < 0.3] = rng.integers(0, 256, dtype=np.uint8)
    return pack_argb(rgb, a)


SHAPES = [(1, 1), (3, 5), (7, 1), (64, 64), (127, 513)]
THRESHOLDS = [0, 219, 220, 221, 255]

# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("alpha", ["opaque", "zero", "mixed"])
@pytest.mark.parametrize("threshold", [0, 220, 255])
def test_argb_matches_reference(shape, alpha, threshold):
    seed = 1000 * shape[0] + shape[1] + 7 * ["opaque", "zero", "mixed"].index(alpha)
    src = random_argb(np.random.default_rng(seed), *shape, alpha=alpha)
    out = np.zeros((*shape, 3), np.uint8)
    white = _tiler.argb_to_rgb(src, out, threshold)
    rgb, ref_white = ref_argb(src, threshold)
    np.testing.assert_array_equal(out, rgb)
    assert white == ref_white
    if alpha == "zero":
        assert (out == 255).all() and white == (out.shape[0] * out.shape[1] if threshold < 255 else 0)


def test_argb_known_words():
    # (alpha, premultiplied R, G, B) -> expected RGB on white, checked by hand
    words = np.array([[0x00000000, 0xFF102030, 0x80402010, 0x01010000, 0xFFDDDDDD, 0xFFDCDDDD]], np.uint32)
    out = np.empty((1, 6, 3), np.uint8)
    white = _tiler.argb_to_rgb(words, out, 220)
    expect = [[255, 255, 255], [0x10, 0x20, 0x30], [0x40 + 127, 0x20 + 127, 0x10 + 127], [255, 254, 254],
              [221, 221, 221], [220, 221, 221]]
    np.testing.assert_array_equal(out[0], expect)
    assert white == 3  # transparent, alpha-1 near-white, and 221 everywhere; 220 in one channel is tissue


def test_argb_malformed_words_clamp():
    # a premultiplied channel above alpha cannot come from OpenSlide; it must clamp, not wrap around
    words = np.array([[0x10FF0000, 0x00FFFFFF]], np.uint32)
    out = np.empty((1, 2, 3), np.uint8)
    _tiler.argb_to_rgb(words, out, 220)
    np.testing.assert_array_equal(out, ref_argb(words, 220)[0])
    np.testing.assert_array_equal(out[0], [[255, 239, 239], [255, 255, 255]])


def test_rgba_every_colour_alpha_pair():
    # all 256 x 256 (channel, alpha) pairs: checks the exact /255 rounding trick exhaustively
    c, a = np.meshgrid(np.arange(256, dtype=np.uint8), np.arange(256, dtype=np.uint8), indexing="ij")
    src = np.stack([c, 255 - c, c // 2, a], axis=-1)
    out = np.empty((256, 256, 3), np.uint8)
    for threshold in THRESHOLDS:
        white = _tiler.rgba_to_rgb(src, out, threshold)
        rgb, ref_white = ref_rgba(src, threshold)
        np.testing.assert_array_equal(out, rgb)
        assert white == ref_white


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("threshold", THRESHOLDS)
def test_rgba_and_rgb_match_reference(shape, threshold):
    rng = np.random.default_rng(sum(shape) + threshold)
    rgba = rng.integers(0, 256, (*shape, 4), dtype=np.uint8)
    rgba[..., :3][rng.random(shape) < 0.5] = 230  # plenty of near-white pixels around the threshold
    out = np.empty((*shape, 3), np.uint8)
    assert _tiler.rgba_to_rgb(rgba, out, threshold) == ref_rgba(rgba, threshold)[1]
    np.testing.assert_array_equal(out, ref_rgba(rgba, threshold)[0])
    rgb = rgba[..., :3].copy()
    assert _tiler.rgb_to_rgb(rgb, out, threshold) == ref_rgb(rgb, threshold)[1]
    np.testing.assert_array_equal(out, rgb)


def test_paper_threshold_boundary():
    # the paper's rule is "above 220": 221 everywhere is background, 220 in any channel is not
    for value, expect in [(221, 1), (220, 0), (255, 1), (0, 0)]:
        px = np.full((1, 1, 3), value, np.uint8)
        assert _tiler.rgb_to_rgb(px, np.empty_like(px), 220) == expect
        px[0, 0, 1] = 255
        assert _tiler.rgb_to_rgb(px, np.empty_like(px), 220) == expect


def test_strided_sources_are_handled():
    rng = np.random.default_rng(1)
    big = random_argb(rng, 40, 50)
    big_rgb = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    big_rgba = rng.integers(0, 256, (40, 50, 4), dtype=np.uint8)
    views = {
        "crop": (big[3:20, 5:30], big_rgb[3:20, 5:30], big_rgba[3:20, 5:30]),
        "step": (big[::3, ::2], big_rgb[::3, ::2], big_rgba[::3, ::2]),
        "flipped": (big[::-1, ::-1], big_rgb[::-1, ::-1], big_rgba[::-1, ::-1]),
        "fortran": (np.asfortranarray(big), np.asfortranarray(big_rgb), np.asfortranarray(big_rgba)),
        "bgr-view": (big.T, big_rgb[..., ::-1], big_rgba[..., [2, 1, 0, 3]]),
    }
    for name, (argb, rgb, rgba) in views.items():
        for fn, src, ref in [(_tiler.argb_to_rgb, argb, ref_argb), (_tiler.rgb_to_rgb, rgb, ref_rgb),
                             (_tiler.rgba_to_rgb, rgba, ref_rgba)]:
            src_before = src.copy()
            out = np.empty((*src.shape[:2], 3), np.uint8)
            assert fn(src, out, 220) == ref(src, 220)[1], name
            np.testing.assert_array_equal(out, ref(src, 220)[0], err_msg=name)
            np.testing.assert_array_equal(src, src_before)


def test_read_only_source_and_in_place():
    rgb = np.random.default_rng(2).integers(0, 256, (9, 11, 3), dtype=np.uint8)
    ro = rgb.copy()
    ro.flags.writeable = False
    out = np.empty_like(rgb)
    _tiler.rgb_to_rgb(ro, out, 220)
    np.testing.assert_array_equal(out, rgb)
    # overlapping source and destination (shifted by one pixel) give what a copy would give
    work = rgb.copy()
    _tiler.rgb_to_rgb(work[:, :-1], work[:, 1:], 220)
    np.testing.assert_array_equal(work[:, 1:], rgb[:, :-1])


def test_output_into_batch_sub_rectangle():
    rng = np.random.default_rng(3)
    batch = np.full((2, 16, 16, 3), 7, np.uint8)
    src = random_argb(rng, 5, 9)
    _tiler.argb_to_rgb(src, batch[1, 2:7, 4:13], 220)
    np.testing.assert_array_equal(batch[1, 2:7, 4:13], ref_argb(src, 220)[0])
    rest = batch.copy()
    rest[1, 2:7, 4:13] = 7
    assert (rest == 7).all()  # nothing outside the rectangle was touched


@pytest.mark.parametrize("kind", ["argb", "rgba", "rgb"])
@pytest.mark.parametrize("placement", [(0, 0, 16, 16), (0, 0, 10, 16), (3, 5, 9, 7), (0, 0, 0, 16),
                                       (16, 16, 0, 0)])
def test_to_slot_pads_white_and_counts_padding(kind, placement):
    y0, x0, h, w = placement
    rng = np.random.default_rng(4)
    src = {"argb": lambda: random_argb(rng, h, w), "rgba": lambda: rng.integers(0, 256, (h, w, 4), np.uint8),
           "rgb": lambda: rng.integers(0, 256, (h, w, 3), np.uint8)}[kind]()
    ref = {"argb": ref_argb, "rgba": ref_rgba, "rgb": ref_rgb}[kind]
    batch = rng.integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    before = batch.copy()
    white = _tiler.to_slot(src, batch, 1, y0, x0, 220)
    expect = np.full((16, 16, 3), 255, np.uint8)
    if h and w:
        expect[y0:y0 + h, x0:x0 + w] = ref(src, 220)[0]
    np.testing.assert_array_equal(batch[1], expect)
    np.testing.assert_array_equal(batch[[0, 2]], before[[0, 2]])
    assert white == int(np.all(expect > 220, axis=-1).sum())


def test_bad_arguments_raise_config_error():
    out = np.empty((4, 4, 3), np.uint8)
    argb = np.zeros((4, 4), np.uint32)
    with pytest.raises(ConfigError, match="uint32"):
        _tiler.argb_to_rgb(argb.astype(np.int64), out)
    with pytest.raises(ConfigError, match=r"\(h, w, 4\)"):
        _tiler.rgba_to_rgb(np.zeros((4, 4, 3), np.uint8), out)
    with pytest.raises(ConfigError, match="4 x 4"):
        _tiler.argb_to_rgb(argb, np.empty((4, 5, 3), np.uint8))
    with pytest.raises(ConfigError, match="strides"):
        _tiler.argb_to_rgb(argb, np.empty((4, 8, 3), np.uint8)[:, ::2])
    with pytest.raises(ConfigError, match="strides"):
        _tiler.argb_to_rgb(argb, np.empty((4, 4, 6), np.uint8)[..., ::2])
    ro = out.copy()
    ro.flags.writeable = False
    with pytest.raises(ConfigError, match="read-only"):
        _tiler.argb_to_rgb(argb, ro)
    for bad in [-1, 256, 220.0, True, "220"]:
        with pytest.raises(ConfigError, match="threshold"):
            _tiler.argb_to_rgb(argb, out, bad)
    batch = np.zeros((2, 4, 4, 3), np.uint8)
    with pytest.raises(ConfigError, match="does not fit"):
        _tiler.to_slot(argb, batch, 0, 1, 0)
    with pytest.raises(ConfigError, match="slot=2"):
        _tiler.to_slot(argb, batch, 2)
    with pytest.raises(ConfigError, match="NHWC"):
        _tiler.to_slot(argb, batch[0], 0)
    with pytest.raises(ConfigError, match="tile must be"):
        _tiler.to_slot(np.zeros((4, 4), np.float32), batch, 0)


def test_white_fraction_matches_reference():
    rng = np.random.default_rng(5)
    for shape in [(1, 1, 3), (13, 17, 4), (50, 3, 3)]:
        img = rng.choice(np.array([0, 220, 221, 255], np.uint8), shape)
        expect = np.all(img[..., :3] > 220, axis=-1).mean()
        assert _tiler.white_fraction(img, 220) == pytest.approx(expect, abs=1e-12)
    assert _tiler.white_fraction(np.zeros((0, 4, 3), np.uint8)) == 1.0


def test_threads_give_the_same_answer():
    rng = np.random.default_rng(6)
    tiles = [random_argb(rng, 256, 256) for _ in range(8)]
    expect = [ref_argb(t, 220) for t in tiles]
    outs = np.empty((8, 256, 256, 3), np.uint8)
    whites = [None] * 8

    def work(i):
        for _ in range(5):
            whites[i] = _tiler.to_slot(tiles[i], outs, i, 0, 0, 220)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(8):
        np.testing.assert_array_equal(outs[i], expect[i][0])
        assert whites[i] == expect[i][1]


# ---------------------------------------------------------------------------------------------------
# statistics of single-channel maps (the writers, LowRes and the pipeline's row sink)


@pytest.mark.parametrize("shape", [(1, 1), (7, 33), (64, 129)])
def test_map_statistics_match_numpy(shape):
    rng = np.random.default_rng(shape[1])
    h, w = shape
    band = rng.integers(0, 256, (h + 3, w + 5), dtype=np.uint8)
    view = band[2:2 + h, 3:3 + w]  # rows walked with the band's stride
    peak, count = _tiler.max_count_u8(view, 100)
    assert (peak, count) == (int(view.max()), int((view >= 100).sum()))
    assert _tiler.max_count_u8(np.zeros((0, 4), np.uint8)) == (0, 0)
    flat = np.full((h, w), 37, np.uint8)
    assert _tiler.uniform_u8(flat) == 37 and _tiler.uniform_u8(flat[:, :0]) == -1
    flat[-1, -1] = 36  # the very last pixel differs
    assert _tiler.uniform_u8(flat) == (-1 if flat.size > 1 else 36)
    for f in (1, 4, 7):
        acc = np.arange(-(-w // f), dtype=np.uint64)
        ref = acc + np.array([view[:, x:x + f].sum(dtype=np.uint64) for x in range(0, w, f)], np.uint64)
        _tiler.add_block_sums_u8(view, f, acc)
        np.testing.assert_array_equal(acc, ref)
    with pytest.raises(ConfigError, match="uint64 array of"):
        _tiler.add_block_sums_u8(view, 4, np.zeros(3, np.int64))
    with pytest.raises(ConfigError, match="factor=0"):
        _tiler.add_block_sums_u8(view, 0, np.zeros(1, np.uint64))
    with pytest.raises(ConfigError, match="2-D uint8"):
        _tiler.max_count_u8(view.astype(np.int16))
