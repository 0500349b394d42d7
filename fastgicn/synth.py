"""Synthetic H&E-like slides with an exact ground-truth tumour mask, streamed to pyramidal TIFF.

A `SyntheticSlide` is a pure function of (level-0 pixel position, seed): white glass with scanner noise and
faint scanner stripes; a few irregular tissue islands of pink eosin stroma with wavy collagen fibres and
sparse normal nuclei (round lymphocyte-like and elongated fibroblast-like, purple hematoxylin); and tumour
regions inside the tissue, both small (XS: every connected component under 50,000 level-0 pixels, the
paper's Table 4 split) and large (XL), whose texture differs: nuclei about four times as dense, larger,
darker, irregular in shape, with clumped chromatin and a pale centre, on a lilac cytoplasm instead of stroma.

Every pixel is computed from its absolute coordinates, so rendering any region, with any tiling or offset,
gives exactly the pixels of a larger render cropped (no seams when tiles are stitched). Three rules keep that
bit-exact: the region fields are value noise interpolated in integer arithmetic (exact in floating point, in
any order), the per-pixel float work is elementwise +, -, *, / only (correctly rounded, so independent of
array shapes and SIMD paths; sines and cosines are looked up, never recomputed), and nuclei are stamps
combined with `max` (order-free). Colours come from a Beer-Lambert table indexed by eosin and hematoxylin
amounts. The mask is the tumour region's defining function evaluated per pixel: 255 where the pixel is in
tissue and in a tumour blob, else 0. Speed: a bounded sampling test (`_Field.classify`) skips the per-pixel
field work on rectangles that are surely all inside or all outside a region, and glass is a table lookup.
The drawing is at a fixed pixel scale (nuclei 5-25 px across); `mpp` only labels the slide. Determinism is
bit-exact for a seed on one platform; the seed's textures are made once with NumPy's sin/exp and rounded to
uint8, so another libm could in rare texels differ by one level.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import ConfigError, SlideError

XS_AREA_LIMIT = 50_000  # level-0 pixels: tumour components below this are small (XS), the paper's Table 4

# Fixed-point scale of the region fields: a field value of 1.0 is _SCALE. Lattice values are in [-1024, 1024),
# bilinear weights in [0, 256] per axis, amplitudes per mille: every noise term is an integer below 2**53.
_LATTICE = 1024
_WEIGHT = 256
_SCALE = 1000.0 * _LATTICE * _WEIGHT * _WEIGHT

_GLASS = np.array([243, 243, 246], np.float64)  # scanner white, RGB
_EOSIN_OD = np.array([0.019, 0.267, 0.129])  # log10 optical density at full eosin (index 255)
_HEMATOXYLIN_OD = np.array([0.599, 0.715, 0.307])  # at full hematoxylin
_STRIPE_WIDTH = 2040  # scanner stripe width in level-0 pixels (an Aperio habit)
_TABLE = 512  # period of the fibre and chromatin textures
_NOISE_TABLE = 509  # period of the scanner noise (prime, so it never lines up with tiles)
_RENDER_CHUNK = 512  # level-0 pixels a side rendered at once, so big regions stay in bounded memory


# ---------------------------------------------------------------------------------------------------------
# Integer hashing and value noise


def _hash(ix, iy, key: int) -> np.ndarray:
    """A well-mixed uint32 of integer coordinates (any int arrays, negative allowed) and a key."""
    h = (np.asarray(ix, np.int64).astype(np.uint32) * np.uint32(0x8DA6B343)) ^ (
        np.asarray(iy, np.int64).astype(np.uint32) * np.uint32(0xD8163841))
    h ^= np.uint32(key & 0xFFFFFFFF)
    h ^= h >> np.uint32(16)
    h *= np.uint32(0x7FEB352D)
    h ^= h >> np.uint32(15)
    h *= np.uint32(0x846CA68B)
    h ^= h >> np.uint32(16)
    return h


def _unit(h: np.ndarray) -> np.ndarray:
    """uint32 hash -> float64 in [0, 1)."""
    return (h >> np.uint32(8)).astype(np.float64) * (1.0 / (1 << 24))


def _rehash(h: np.ndarray, salt: int) -> np.ndarray:
    return _hash(h, np.int64(salt), 0x5BD1E995)


@dataclass(frozen=True)
class _Octave:
    """Value noise on a square lattice of `spacing` pixels.

    Precise octaves have lattice values in [-1024, 1024) times `amplitude` (per mille of the field unit
    `_SCALE`) and are summed in float64; coarse ones (amplitude 1) have values in [-128, 128), so every value
    (at most 2**23) is exact in float32, which is twice as fast for the colour modulations.
    """

    spacing: int
    amplitude: int
    key: int
    coarse: bool = False

    @property
    def unit(self) -> float:
        """The value of a lattice point at full amplitude after interpolation."""
        return _SCALE / 1000.0 if not self.coarse else 128.0 * _WEIGHT * _WEIGHT

    def lattice(self, ix, iy, dtype=np.float64) -> np.ndarray:
        h = _hash(ix, iy, self.key)
        if self.coarse:
            return ((h >> np.uint32(24)).astype(np.int32) - 128).astype(dtype)
        return (((h >> np.uint32(21)).astype(np.int64) - _LATTICE) * self.amplitude).astype(dtype)

    def weights(self, coord) -> tuple[np.ndarray, np.ndarray]:
        """Lattice cell of each integer coordinate and the smoothstep weight (0..256) of the upper corner."""
        coord = np.asarray(coord, np.int64)
        cell = np.floor_divide(coord, self.spacing)
        f = (coord - cell * self.spacing).astype(np.float64) / self.spacing
        return cell, np.floor(f * f * (3.0 - 2.0 * f) * _WEIGHT + 0.5)

    def grid(self, x0: int, y0: int, w: int, h: int) -> np.ndarray:
        """The noise on a pixel grid as exact integers (float64, or float32 when coarse): interpolate along
        x on the few lattice rows, then along y. Exact in any order, so no BLAS is needed (and tiny threaded
        products are slow)."""
        dtype = np.float32 if self.coarse else np.float64
        cx, wx = self.weights(np.arange(x0, x0 + w))
        cy, wy = self.weights(np.arange(y0, y0 + h))
        lat = self.lattice(np.arange(cx[0], cx[-1] + 2)[None, :], np.arange(cy[0], cy[-1] + 2)[:, None],
                           dtype)
        ix = cx - cx[0]
        wx, wy = wx.astype(dtype), wy.astype(dtype)
        rows = lat[:, ix] * (_WEIGHT - wx) + lat[:, ix + 1] * wx
        out = np.empty((h, w), dtype)
        starts = np.r_[0, np.nonzero(np.diff(cy))[0] + 1, h]
        for y0_, y1_ in zip(starts[:-1], starts[1:]):  # runs of pixel rows between two lattice rows
            j = cy[y0_] - cy[0]
            band = np.multiply(rows[j], (_WEIGHT - wy[y0_:y1_])[:, None], out=out[y0_:y1_])
            band += rows[j + 1] * wy[y0_:y1_, None]
        return out

    def points(self, px, py) -> np.ndarray:
        """The same noise at integer points, with the same integer arithmetic (bit-identical to `grid`)."""
        cx, wx = self.weights(px)
        cy, wy = self.weights(py)
        corners = self.lattice(np.stack([cx, cx + 1, cx, cx + 1]), np.stack([cy, cy, cy + 1, cy + 1]))
        c00, c10, c01, c11 = corners
        return (_WEIGHT - wy) * ((_WEIGHT - wx) * c00 + wx * c10) + wy * ((_WEIGHT - wx) * c01 + wx * c11)


class _Noise:
    """A sum of value-noise octaves: a smooth random modulation in [-1, 1] times the amplitudes."""

    def __init__(self, octaves: list[_Octave]):
        self.octaves = octaves
        self.unit = octaves[0].unit  # all octaves of one noise share precise/coarse

    def grid(self, x0: int, y0: int, w: int, h: int) -> np.ndarray:
        field = self.octaves[0].grid(x0, y0, w, h)
        for octave in self.octaves[1:]:
            field = field + octave.grid(x0, y0, w, h)
        return field

    def points(self, px, py) -> np.ndarray:
        field = self.octaves[0].points(px, py)
        for octave in self.octaves[1:]:
            field = field + octave.points(px, py)
        return field


@dataclass
class _Ellipses:
    """Rotated ellipses (islands or tumour blobs) as arrays: centre, semi-axes, direction of the long axis."""

    cx: np.ndarray
    cy: np.ndarray
    a: np.ndarray
    b: np.ndarray
    cos: np.ndarray
    sin: np.ndarray

    @staticmethod
    def from_list(items) -> _Ellipses:
        arr = np.array(items, np.float64).reshape(-1, 5)
        return _Ellipses(arr[:, 0], arr[:, 1], arr[:, 2], arr[:, 3], np.cos(arr[:, 4]), np.sin(arr[:, 4]))

    def __len__(self) -> int:
        return len(self.cx)

    def q(self, k: int, xs, ys):
        """Quadratic form, < 1 inside ellipse k; xs, ys broadcast (a row and a column, or point arrays)."""
        dx, dy = xs - self.cx[k], ys - self.cy[k]
        u = dx * self.cos[k] + dy * self.sin[k]
        v = dy * self.cos[k] - dx * self.sin[k]
        return u * u * (1.0 / (self.a[k] * self.a[k])) + v * v * (1.0 / (self.b[k] * self.b[k]))


class _Field:
    """max over ellipses of (1 - q), floored at `floor`, plus value noise; positive inside the region.

    The floor makes ellipses far from a region contribute exactly the floor, so leaving them out of the sum
    (which `grid` and `points` do for speed) never changes a value.
    """

    def __init__(self, ellipses: _Ellipses | None, octaves: list[_Octave], margin: float = 0.05):
        self.ellipses, self.octaves = ellipses, octaves
        self.noise_max = sum(o.amplitude for o in octaves) / 1000.0
        self.floor = -(self.noise_max + margin)
        self.floor_fixed = math.floor(self.floor * _SCALE)
        if ellipses is not None:
            # beyond this distance from its centre an ellipse's (1 - q) is below the floor
            self.reach = ellipses.a * math.sqrt(1.0 - self.floor)

    def relevant(self, x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
        """Indices of ellipses that can be above the floor somewhere in [x0, x1) x [y0, y1)."""
        if self.ellipses is None or not len(self.ellipses):
            return np.zeros(0, np.int64)
        e = self.ellipses
        dx = np.maximum(np.maximum(x0 - e.cx, e.cx - (x1 - 1)), 0.0)
        dy = np.maximum(np.maximum(y0 - e.cy, e.cy - (y1 - 1)), 0.0)
        return np.nonzero(dx * dx + dy * dy < self.reach * self.reach)[0]

    def _shape(self, xs, ys, which) -> np.ndarray | float:
        base: np.ndarray | float = float(self.floor_fixed)
        for k in which:
            q = np.minimum(self.ellipses.q(k, xs, ys), 8.0)
            base = np.maximum(base, np.floor((1.0 - q) * _SCALE))
        return base

    def grid(self, x0: int, y0: int, w: int, h: int, which=None) -> np.ndarray:
        if which is None:
            which = self.relevant(x0, y0, x0 + w, y0 + h)
        xs = np.arange(x0, x0 + w, dtype=np.float64)[None, :]
        ys = np.arange(y0, y0 + h, dtype=np.float64)[:, None]
        field = np.broadcast_to(self._shape(xs, ys, which), (h, w))
        for octave in self.octaves:
            field = field + octave.grid(x0, y0, w, h)
        return field

    def points(self, px: np.ndarray, py: np.ndarray, which=None) -> np.ndarray:
        if which is None:
            which = self.relevant(px.min(), py.min(), px.max() + 1, py.max() + 1) if px.size else []
        fx, fy = px.astype(np.float64), py.astype(np.float64)
        field = np.broadcast_to(self._shape(fx, fy, which), px.shape)
        for octave in self.octaves:
            field = field + octave.points(px, py)
        return field

    def classify(self, x0: int, y0: int, x1: int, y1: int, step: int = 64) -> int:
        """+1 if the field is > 0 on every pixel of [x0, x1) x [y0, y1), -1 if on none, 0 if unknown.

        Samples every `step` pixels and bounds the change between samples by the field's Lipschitz constant
        (ellipse part: |grad(1 - q)| <= 2 sqrt(q) / b with q <= 8; value noise: 3 * amplitude / spacing per
        axis, plus slack for the 8-bit weights). Deep inside or far outside a region this skips the per-pixel
        work; the answer is only ever "unknown" when unsure, so it never changes a pixel.
        """
        which = self.relevant(x0, y0, x1, y1)
        if which.size == 0:
            return -1
        xs = np.unique(np.r_[np.arange(x0, x1, step), x1 - 1])
        ys = np.unique(np.r_[np.arange(y0, y1, step), y1 - 1])
        px, py = np.meshgrid(xs, ys)
        values = self.points(px.ravel(), py.ravel(), which)
        lipschitz = 2.0 * math.sqrt(8.0) / float(self.ellipses.b[which].min())
        slack = 1e-6
        for o in self.octaves:
            lipschitz += math.sqrt(2.0) * 3.0 * o.amplitude / 1000.0 / o.spacing
            slack += 0.02 * o.amplitude / 1000.0
        bound = (lipschitz * step / math.sqrt(2.0) + slack) * _SCALE
        if values.min() > bound:
            return 1
        if values.max() <= -bound:
            return -1
        return 0


# ---------------------------------------------------------------------------------------------------------
# Textures, made once per slide from its seed


def _periodic_blur(img: np.ndarray, radius: int, axis: int) -> np.ndarray:
    out = img.copy()
    for shift in range(1, radius + 1):
        out += np.roll(img, shift, axis) + np.roll(img, -shift, axis)
    return out / (2 * radius + 1)


def _fibre_texture(rng: np.random.Generator, direction: float) -> np.ndarray:
    """A periodic _TABLE x _TABLE uint8 texture of wavy collagen fibres running roughly along `direction`."""
    canvas = np.zeros((_TABLE, _TABLE))
    for _ in range(420):
        x0, y0 = rng.uniform(0, _TABLE, 2)
        theta = direction + rng.normal(0, 0.18)
        length, amp = rng.uniform(60, 320), rng.uniform(0.5, 5.0)
        wavelength, phase = rng.uniform(30, 120), rng.uniform(0, 2 * np.pi)
        t = np.arange(0, length, 0.5)
        wave = amp * np.sin(2 * np.pi * t / wavelength + phase)
        xs = x0 + t * np.cos(theta) - wave * np.sin(theta)
        ys = y0 + t * np.sin(theta) + wave * np.cos(theta)
        strength = rng.uniform(0.4, 1.0)
        for off in range(int(rng.integers(1, 4))):  # fibre thickness 1..3 px
            np.add.at(canvas, ((ys + off * np.cos(theta)).astype(np.int64) % _TABLE,
                               (xs - off * np.sin(theta)).astype(np.int64) % _TABLE), strength)
    canvas = _periodic_blur(_periodic_blur(canvas, 1, 0), 1, 1)
    fibres = 1.0 - np.exp(-canvas * 1.6)
    # pale clefts between collagen bundles: a slow periodic modulation
    gaps = _periodic_blur(_periodic_blur(rng.random((_TABLE, _TABLE)), 12, 0), 12, 1)
    gaps = np.clip((gaps - gaps.mean()) / (gaps.std() + 1e-9) * 0.35 + 0.8, 0.25, 1.0)
    return np.clip(fibres * gaps * 255 + 0.5, 0, 255).astype(np.uint8)


def _blob_texture(rng: np.random.Generator, radius: int) -> np.ndarray:
    """A periodic uint8 texture of soft blobs (chromatin clumps, cytoplasm granularity)."""
    img = _periodic_blur(_periodic_blur(rng.random((_TABLE, _TABLE)), radius, 0), radius, 1)
    img = (img - img.mean()) / (img.std() + 1e-9)
    return np.clip(img * 60 + 128, 0, 255).astype(np.uint8)


def _wrap_pad(table: np.ndarray, margin: int = _RENDER_CHUNK) -> np.ndarray:
    """A periodic table extended by `margin` wrapped rows and columns, so windows are plain slices."""
    return np.pad(table, [(0, margin), (0, margin)] + [(0, 0)] * (table.ndim - 2), mode="wrap")


def _window(padded: np.ndarray, period: int, x0: int, y0: int, w: int, h: int) -> np.ndarray:
    """The h x w window at (x0, y0) of a periodic table given by `_wrap_pad` (a view when it fits)."""
    oy, ox = y0 % period, x0 % period
    if h <= padded.shape[0] - period and w <= padded.shape[1] - period:
        return padded[oy:oy + h, ox:ox + w]
    rows, cols = (np.arange(h) + oy) % period, (np.arange(w) + ox) % period
    return padded[:period, :period].take(rows, axis=0).take(cols, axis=1)


def _stain_lut() -> np.ndarray:
    """RGB (65536 x 3 uint8) for eosin index e and hematoxylin index h at row e * 256 + h (Beer-Lambert)."""
    e = np.arange(256)[:, None, None] / 255.0
    h = np.arange(256)[None, :, None] / 255.0
    od = e * _EOSIN_OD + h * _HEMATOXYLIN_OD
    return np.clip(_GLASS * 10.0 ** (-od) + 0.5, 0, 255).astype(np.uint8).reshape(-1, 3)


# ---------------------------------------------------------------------------------------------------------
# Nuclei


@dataclass(frozen=True)
class _Nuclei:
    """One population of nuclei on a jittered grid: at most one per `cell` x `cell` square."""

    cell: int
    key: int
    stamp: int  # half-size of the square each nucleus is drawn in
    tumour: bool

    def candidates(self, x0: int, y0: int, x1: int, y1: int):
        """Cells whose nucleus can touch [x0, x1) x [y0, y1): centres (float64) and per-nucleus hashes."""
        r = self.stamp + 1
        i = np.arange((x0 - r) // self.cell, (x1 + r) // self.cell + 1)
        j = np.arange((y0 - r) // self.cell, (y1 + r) // self.cell + 1)
        ii, jj = np.meshgrid(i, j)
        ii, jj = ii.ravel(), jj.ravel()
        h = _hash(ii, jj, self.key)
        cx = (ii + 0.1 + 0.8 * _unit(h)) * self.cell
        cy = (jj + 0.1 + 0.8 * _unit(_rehash(h, 1))) * self.cell
        keep = (cx > x0 - r) & (cx < x1 + r) & (cy > y0 - r) & (cy < y1 + r)
        return cx[keep], cy[keep], h[keep]


# ---------------------------------------------------------------------------------------------------------


class SyntheticSlide:
    """A deterministic synthetic H&E slide of `width` x `height` level-0 pixels.

    `render(l0_x, l0_y, w, h, downsample)` returns the pixels and the tumour mask of any region; pixels
    outside the slide are pure white (255) with mask 0. `render_mask` gives the mask alone, much faster.
    """

    def __init__(self, width: int, height: int, seed: int = 0, mpp: float = 0.25):
        for name, value in (("width", width), ("height", height)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
                raise ConfigError(f"synthetic slide {name}={value!r}: must be a positive integer")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**63:
            raise ConfigError(f"synthetic slide seed={seed!r}: must be an integer >= 0")
        if not (isinstance(mpp, (int, float)) and math.isfinite(mpp) and mpp > 0):
            raise ConfigError(f"synthetic slide mpp={mpp!r}: microns per pixel must be positive "
                              "(0.25 is about 40x)")
        self.width, self.height, self.seed, self.mpp = int(width), int(height), int(seed), float(mpp)
        rng = np.random.default_rng([self.seed, 0x5EED])
        keys = [int(k) for k in rng.integers(0, 2**32, 32)]
        self._layout(rng, keys)
        self._normal = _Nuclei(cell=20, key=keys[10], stamp=12, tumour=False)
        self._tumour = _Nuclei(cell=17, key=keys[11], stamp=13, tumour=True)
        self._cellularity = _Noise([_Octave(256, 500, keys[12]), _Octave(64, 200, keys[13])])
        self._fibre_mix = _Noise([_Octave(384, 1, keys[14], coarse=True)])
        self._stain = _Noise([_Octave(640, 1, keys[15], coarse=True)])
        directions = rng.uniform(0, np.pi, 2)
        self._fibres = tuple(_wrap_pad(_fibre_texture(rng, d)) for d in directions)
        self._fibre_angle_idx = np.rint(directions * (256 / np.pi)).astype(np.int64) % 256
        self._chromatin = _blob_texture(rng, 1).ravel()
        self._cytoplasm = _wrap_pad(_blob_texture(rng, 3))
        self._lut = _stain_lut()
        noise = np.clip(np.rint(rng.normal(0, 1.2, (_NOISE_TABLE, _NOISE_TABLE, 3))), -4, 4).astype(np.int16)
        self._noise = _wrap_pad(noise)  # scanner noise
        self._glass = _wrap_pad((noise + _GLASS.astype(np.int16)).astype(np.uint8))  # glass + noise
        n_stripes = self.width // _STRIPE_WIDTH + 1
        self._stripes = rng.integers(-1, 2, n_stripes).astype(np.int16)
        angles = np.arange(256) * (np.pi / 256)  # looked up, never computed per call (bit-exact everywhere)
        self._cos, self._sin = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)

    @property
    def dimensions(self) -> tuple[int, int]:
        return self.width, self.height

    # -- layout: islands, large and small tumours --------------------------------------------------------

    def _layout(self, rng: np.random.Generator, keys: list[int]) -> None:
        w, h = self.width, self.height
        short = min(w, h)
        n_islands = int(rng.integers(2, 5)) + min(int(max(w, h) / short) - 1, 8)
        islands: list[tuple] = []
        for i in range(n_islands):
            for _attempt in range(200):
                a = short * (0.3 if i == 0 else rng.uniform(0.14, 0.26))
                b = a * (rng.uniform(0.75, 0.9) if i == 0 else rng.uniform(0.55, 0.9))
                margin = a * 0.95
                if 2 * margin >= w or 2 * margin >= h:
                    a, b, margin = short * 0.3, short * 0.25, short * 0.3
                cx, cy = rng.uniform(margin, w - margin), rng.uniform(margin, h - margin)
                if all(math.hypot(cx - o[0], cy - o[1]) > (a + o[2]) * 1.05 for o in islands):
                    islands.append((cx, cy, a, b, rng.uniform(0, np.pi)))
                    break
        self.islands = _Ellipses.from_list(islands)
        a_mean = float(np.mean(self.islands.a))
        fine = int(np.clip(40_000 / a_mean, 2, 50))  # edge raggedness about 20 px wide at any island size
        self._tissue = _Field(self.islands, [_Octave(max(32, int(a_mean * 0.5)), 300, keys[0]),
                                             _Octave(max(16, int(a_mean * 0.12)), 100, keys[1]),
                                             _Octave(20, fine, keys[2])])

        xl: list[tuple] = []
        for i, (cx, cy, a, b, angle) in enumerate(islands):
            if i > 0 and rng.random() < 0.35:
                continue
            ta = max(b * rng.uniform(0.45, 0.6), 170.0)
            tb = ta * rng.uniform(0.65, 0.9)
            r = rng.uniform(0, 0.3) * b
            phi = rng.uniform(0, 2 * np.pi)
            xl.append((cx + r * math.cos(phi), cy + r * math.sin(phi), ta, tb, rng.uniform(0, np.pi)))
        xl_arr = _Ellipses.from_list(xl)
        xl_mean = float(np.mean(xl_arr.a)) if xl else 200.0
        self._xl = _Field(xl_arr, [_Octave(max(24, int(xl_mean * 0.45)), 250, keys[3]),
                                   _Octave(max(16, int(xl_mean * 0.12)), 80, keys[4])])

        # Small tumours: semi-axes <= 85 px and noise < 0.28, so each blob is inside q < 1.33 of its ellipse:
        # area <= 1.33 * pi * 85 * 85 = 30,200 px < 50,000, and blobs are placed apart so none merge.
        xs: list[tuple] = []
        xs_reach = math.sqrt(1.33)
        xl_reach = math.sqrt(1.0 + self._xl.noise_max + 0.05)

        def try_place(island, q_max: float) -> bool:
            cx, cy, a, b, angle = island
            sa = rng.uniform(45, 85)
            sb = sa * rng.uniform(0.6, 1.0)
            r, phi = math.sqrt(rng.uniform(0, q_max)), rng.uniform(0, 2 * np.pi)  # q <= q_max in the island
            u, v = r * a * math.cos(phi), r * b * math.sin(phi)
            px = cx + u * math.cos(angle) - v * math.sin(angle)
            py = cy + u * math.sin(angle) + v * math.cos(angle)
            if not (0 <= px < w and 0 <= py < h):
                return False
            if any(math.hypot(px - t[0], py - t[1]) <= t[2] * xl_reach + sa * xs_reach + 24 for t in xl):
                return False
            if any(math.hypot(px - t[0], py - t[1]) <= (t[2] + sa) * xs_reach + 24 for t in xs):
                return False
            xs.append((px, py, sa, sb, rng.uniform(0, np.pi)))
            return True

        for island in islands:
            count = int(np.clip(math.pi * island[2] * island[3] / 250_000, 1, 30)) + int(rng.integers(0, 2))
            placed = 0
            for _attempt in range(60 * count):
                placed += try_place(island, 0.45)
                if placed == count:
                    break
        for attempt in range(400):  # at least two per slide when they fit, nearer the island edges if need be
            if len(xs) >= 2:
                break
            try_place(islands[attempt % len(islands)], 0.7)
        self._xs = _Field(_Ellipses.from_list(xs), [_Octave(40, 220, keys[5]), _Octave(16, 60, keys[6])])

    # -- per-pixel fields --------------------------------------------------------------------------------

    def _regions(self, x0: int, y0: int, x1: int, y1: int) -> _Regions:
        """Which of tissue / tumour are all-in, all-out or mixed over a rectangle (see `_Field.classify`)."""
        return _Regions(self._tissue.classify(x0, y0, x1, y1), self._xl.classify(x0, y0, x1, y1),
                        self._xs.classify(x0, y0, x1, y1))

    def _masks(self, x0: int, y0: int, w: int, h: int, regions: _Regions):
        """Per-pixel tissue and tumour (tumour within tissue) booleans, or None for all-False."""
        if regions.tissue < 0:
            return None, None
        tissue = np.ones((h, w), bool) if regions.tissue > 0 else self._tissue.grid(x0, y0, w, h) > 0
        if regions.xl > 0 or regions.xs > 0:
            return tissue, tissue
        tumour = None
        for field, state in ((self._xl, regions.xl), (self._xs, regions.xs)):
            if state == 0:
                inside = field.grid(x0, y0, w, h) > 0
                tumour = inside if tumour is None else tumour | inside
        return tissue, None if tumour is None else tumour & tissue

    def _tumour_points(self, px: np.ndarray, py: np.ndarray, regions: _Regions) -> np.ndarray:
        if regions.xl > 0 or regions.xs > 0:
            return np.ones(px.shape, bool)
        out = np.zeros(px.shape, bool)
        for field, state in ((self._xl, regions.xl), (self._xs, regions.xs)):
            if state == 0:
                out |= field.points(px, py) > 0
        return out

    # -- rendering ---------------------------------------------------------------------------------------

    def render_mask(self, l0_x: int, l0_y: int, w: int, h: int) -> np.ndarray:
        """The ground-truth mask (uint8 h x w, 255 tumour, 0 normal or glass) of a level-0 region.

        The same pixels as `render(...)[1]` at downsample 1, without drawing the slide (much faster).
        """
        _check_region(l0_x, l0_y, w, h, 1)
        mask = np.zeros((h, w), np.uint8)
        x0, y0 = max(l0_x, 0), max(l0_y, 0)
        x1, y1 = min(l0_x + w, self.width), min(l0_y + h, self.height)
        for cy in range(y0, y1, _RENDER_CHUNK):
            for cx in range(x0, x1, _RENDER_CHUNK):
                cw, ch = min(_RENDER_CHUNK, x1 - cx), min(_RENDER_CHUNK, y1 - cy)
                xl = self._xl.classify(cx, cy, cx + cw, cy + ch)
                xs = self._xs.classify(cx, cy, cx + cw, cy + ch)
                if xl < 0 and xs < 0:  # most of a slide: decided without looking at the tissue
                    continue
                regions = _Regions(self._tissue.classify(cx, cy, cx + cw, cy + ch), xl, xs)
                _, tumour = self._masks(cx, cy, cw, ch, regions)
                if tumour is not None:
                    mask[cy - l0_y:cy - l0_y + ch, cx - l0_x:cx - l0_x + cw] = tumour * np.uint8(255)
        return mask

    def render(self, l0_x: int, l0_y: int, w: int, h: int, downsample: int = 1):
        """RGB (uint8 h x w x 3) and mask (uint8 h x w, 0/255) of the region whose level-0 origin is
        (l0_x, l0_y) and which covers w*downsample x h*downsample level-0 pixels.

        With downsample d > 1 each output pixel is the rounded mean of its d x d level-0 pixels, and the mask
        is 255 where at least half of them are tumour; for d = 2 this is exactly the pyramid's level 1.
        The cost grows with d^2 (read a written pyramid for thumbnails).
        """
        _check_region(l0_x, l0_y, w, h, downsample)
        d = int(downsample)
        rgb = np.empty((h, w, 3), np.uint8)
        mask = np.empty((h, w), np.uint8)
        step = max(1, _RENDER_CHUNK // d)
        for oy in range(0, h, step):
            for ox in range(0, w, step):
                cw, ch = min(step, w - ox), min(step, h - oy)
                x, y = l0_x + ox * d, l0_y + oy * d
                if x >= self.width or y >= self.height or x + cw * d <= 0 or y + ch * d <= 0:
                    rgb[oy:oy + ch, ox:ox + cw] = 255  # wholly outside the slide
                    mask[oy:oy + ch, ox:ox + cw] = 0
                    continue
                part_rgb, part_mask = self._render_level0(x, y, cw * d, ch * d)
                if d > 1:
                    part_rgb, part_mask = _reduce(part_rgb, part_mask, d)
                rgb[oy:oy + ch, ox:ox + cw] = part_rgb
                mask[oy:oy + ch, ox:ox + cw] = part_mask
        return rgb, mask

    def _render_level0(self, l0_x: int, l0_y: int, w: int, h: int):
        x0, y0 = max(l0_x, 0), max(l0_y, 0)
        x1, y1 = min(l0_x + w, self.width), min(l0_y + h, self.height)
        if x1 <= x0 or y1 <= y0:
            return np.full((h, w, 3), 255, np.uint8), np.zeros((h, w), np.uint8)
        if (x0, y0, x1, y1) == (l0_x, l0_y, l0_x + w, l0_y + h):
            return self._render_inside(x0, y0, w, h)
        rgb = np.full((h, w, 3), 255, np.uint8)
        mask = np.zeros((h, w), np.uint8)
        inner = (slice(y0 - l0_y, y1 - l0_y), slice(x0 - l0_x, x1 - l0_x))
        rgb[inner], mask[inner] = self._render_inside(x0, y0, x1 - x0, y1 - y0)
        return rgb, mask

    def _stripe_row(self, x0: int, w: int) -> np.ndarray:
        """Scanner stripe offset of each column, repeated for R, G, B (int16, length 3 w)."""
        return np.repeat(self._stripes[np.arange(x0, x0 + w) // _STRIPE_WIDTH], 3)

    def _render_inside(self, x0: int, y0: int, w: int, h: int):
        """Render a region that lies inside the slide. Work is done on (h, 3 w) arrays: broadcasting over
        a last axis of 3 is slow in NumPy."""
        m = max(self._normal.stamp, self._tumour.stamp) + 2  # nuclei drawn from just outside can reach in
        regions = self._regions(x0 - m, y0 - m, x0 + w + m, y0 + h + m)
        if regions.tissue < 0:  # glass: glass + noise + stripe never leaves 0..255, so uint8 wraps exactly
            glass = _window(self._glass, _NOISE_TABLE, x0, y0, w, h).reshape(h, 3 * w)
            rgb = glass + self._stripe_row(x0, w).astype(np.uint8)[None, :]
            return rgb.reshape(h, w, 3), np.zeros((h, w), np.uint8)
        tissue, tumour = self._masks(x0, y0, w, h, regions)

        mix = self._fibre_mix.grid(x0, y0, w, h) * np.float32(1.5 / self._fibre_mix.unit) + np.float32(0.5)
        mix = np.clip(mix, 0.0, 1.0)
        fib_a = _window(self._fibres[0], _TABLE, x0, y0, w, h).astype(np.float32)
        fib_b = _window(self._fibres[1], _TABLE, x0 + 89, y0 + 171, w, h).astype(np.float32)
        fibre = (fib_a * mix + fib_b * (np.float32(1.0) - mix)) * np.float32(1.0 / 255)
        stain = self._stain.grid(x0, y0, w, h) * np.float32(0.15 / self._stain.unit) + np.float32(1.0)

        eosin = (np.float32(55.0) + np.float32(165.0) * fibre) * stain
        hema = np.float32(6.0) + np.float32(10.0) * fibre
        if tumour is not None:
            cyto = _window(self._cytoplasm, _TABLE, x0, y0, w, h).astype(np.float32) * np.float32(1.0 / 255)
            eosin = np.where(tumour, (np.float32(70.0) + np.float32(45.0) * cyto) * stain, eosin)
            hema = np.where(tumour, np.float32(30.0) + np.float32(40.0) * cyto, hema)
        if regions.tissue == 0:
            eosin = eosin * tissue
            hema = hema * tissue

        nuclei = np.zeros((h, w), np.uint8)
        self._draw_nuclei(nuclei, x0, y0, w, h, self._normal, regions)
        self._draw_nuclei(nuclei, x0, y0, w, h, self._tumour, regions)
        nuc = nuclei.astype(np.float32)
        eosin = eosin * (np.float32(1.0) - nuc * np.float32(1.0 / 450))
        hema = np.maximum(hema, nuc)

        index = np.clip(eosin + np.float32(0.5), 0, 255).astype(np.int32) * 256
        index += np.clip(hema + np.float32(0.5), 0, 255).astype(np.int32)
        rgb = np.take(self._lut, index, axis=0).reshape(h, 3 * w).astype(np.int16)
        rgb += _window(self._noise, _NOISE_TABLE, x0, y0, w, h).reshape(h, 3 * w)
        rgb += self._stripe_row(x0, w)[None, :]
        np.clip(rgb, 0, 255, out=rgb)
        mask = np.zeros((h, w), np.uint8) if tumour is None else tumour * np.uint8(255)
        return rgb.astype(np.uint8).reshape(h, w, 3), mask

    def _draw_nuclei(self, out: np.ndarray, x0: int, y0: int, w: int, h: int, pop: _Nuclei,
                     regions: _Regions) -> None:
        """Draw one population's nuclei touching the region into `out` (hematoxylin, max-combined)."""
        if pop.tumour and regions.xl < 0 and regions.xs < 0:
            return
        cx, cy, hsh = pop.candidates(x0, y0, x0 + w, y0 + h)
        if cx.size == 0:
            return
        px, py = np.floor(cx).astype(np.int64), np.floor(cy).astype(np.int64)
        # membership is decided at the centre pixel with the same functions as the mask, so it is exact
        if regions.tissue == 0:
            tissue = self._tissue.points(px, py) > 0
            px, py, cx, cy, hsh = px[tissue], py[tissue], cx[tissue], cy[tissue], hsh[tissue]
            if px.size == 0:
                return
        tumour = self._tumour_points(px, py, regions)
        u1 = _unit(_rehash(hsh, 2))
        if pop.tumour:
            keep = tumour & (u1 < 0.85)
        else:
            cell = self._cellularity.points(px, py) * (1.0 / self._cellularity.unit)
            keep = ~tumour & (u1 < np.clip(0.3 + 0.45 * cell, 0.08, 0.62))
        if not keep.any():
            return
        px, py, cx, cy, hsh = px[keep], py[keep], cx[keep], cy[keep], hsh[keep]
        u2, u3, u4, u5, u6 = (_unit(_rehash(hsh, salt)) for salt in range(3, 8))
        angle_idx = (_rehash(hsh, 9) >> np.uint32(24)).astype(np.int64)
        if pop.tumour:  # larger, darker, irregular, clumped chromatin with a pale centre
            a = 6.5 + 3.0 * u2 + 2.0 * (u6 > 0.92)
            b = a * (0.7 + 0.25 * u3)
            dark = 185.0 + 60.0 * u4
            k3 = 0.04 + 0.12 * u5
            k2 = 0.5 * u6 - 0.25
            base, gain, pale = 0.5, 0.5, 0.35
        else:  # round lymphocyte-like, or elongated fibroblast-like along the fibres
            round_ = u2 < 0.5
            a = np.where(round_, 4.5 + 1.5 * u3, 8.0 + 3.0 * u3)
            b = np.where(round_, a * (0.85 + 0.15 * u4), 2.2 + 1.0 * u4)
            dark = np.where(round_, 200.0 + 35.0 * u5, 165.0 + 45.0 * u5)
            k3 = k2 = None
            base, gain, pale = 0.85, 0.15, 0.0
            # the fibre blend weight is >= 0.5 where its field is >= 0: take that texture's direction
            along = np.where(self._fibre_mix.points(px, py) >= 0, self._fibre_angle_idx[0],
                             self._fibre_angle_idx[1])
            angle_idx = np.where(round_, angle_idx, (along + angle_idx % 24 - 12) % 256)

        s = pop.stamp
        offs = np.arange(-s, s + 1, dtype=np.float32)
        fx = (cx - px).astype(np.float32)[:, None, None]
        fy = (cy - py).astype(np.float32)[:, None, None]
        dx = offs[None, None, :] - fx
        dy = offs[None, :, None] - fy
        c = self._cos[angle_idx][:, None, None]
        sn = self._sin[angle_idx][:, None, None]
        un = (dx * c + dy * sn) * (np.float32(1.0) / a.astype(np.float32))[:, None, None]
        vn = (dy * c - dx * sn) * (np.float32(1.0) / b.astype(np.float32))[:, None, None]
        q = un * un + vn * vn
        if k3 is not None:
            q = q + k2.astype(np.float32)[:, None, None] * un * vn \
                + k3.astype(np.float32)[:, None, None] * un * (un * un - np.float32(3.0) * vn * vn)
        alpha = np.clip((np.float32(1.0) - q) * np.float32(4.0), 0.0, 1.0)
        ioffs = np.arange(-s, s + 1)
        rows = ((py[:, None, None] + ioffs[None, :, None]) % _TABLE) * _TABLE
        chrom = np.take(self._chromatin, rows + (px[:, None, None] + ioffs[None, None, :]) % _TABLE)
        chrom = np.float32(base) + np.float32(gain / 255) * chrom.astype(np.float32)
        if pale:
            centre = np.clip(np.float32(1.0) - q * np.float32(1.6), 0.0, 1.0)
            chrom = chrom * (np.float32(1.0) - np.float32(pale) * centre)
        value = np.clip(alpha * chrom * dark.astype(np.float32)[:, None, None], 0, 255).astype(np.uint8)

        ys = py[:, None, None] - y0 + ioffs[None, :, None]
        xs = px[:, None, None] - x0 + ioffs[None, None, :]
        inside = (ys >= 0) & (ys < h) & (xs >= 0) & (xs < w) & (value > 0)
        np.maximum.at(out.reshape(-1), (ys * w + xs)[inside], value[inside])


@dataclass(frozen=True)
class _Regions:
    """Per rectangle: +1 all inside, -1 all outside, 0 mixed, for tissue and the two tumour fields."""

    tissue: int
    xl: int
    xs: int


def _check_region(l0_x, l0_y, w, h, downsample) -> None:
    for name, value in (("l0_x", l0_x), ("l0_y", l0_y)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ConfigError(f"render {name}={value!r}: must be an integer (level-0 pixels)")
    for name, value in (("w", w), ("h", h), ("downsample", downsample)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
            raise ConfigError(f"render {name}={value!r}: must be a positive integer")


def _reduce(rgb: np.ndarray, mask: np.ndarray, d: int):
    """d x d block mean (rounded half up) of the RGB, and 255 where at least half the block is tumour."""
    h, w = rgb.shape[0] // d, rgb.shape[1] // d
    n = d * d
    total = rgb.reshape(h, d, w, d, 3).astype(np.int32).sum(axis=(1, 3))
    votes = (mask.reshape(h, d, w, d) >= 128).sum(axis=(1, 3))
    return ((total + n // 2) // n).astype(np.uint8), np.where(2 * votes >= n, np.uint8(255), np.uint8(0))


# ---------------------------------------------------------------------------------------------------------
# Writing slides

from .naming import mask_path_for  # noqa: E402,F401 (the one rule; re-exported for callers)

SLIDE_SUFFIXES = {".svs": "aperio", ".tif": "tiff", ".tiff": "tiff"}
SLIDE_FORMATS = ("aperio", "tiff")
# "aperio": as an Aperio 40x scanner lays out an SVS (level 0, a stripped thumbnail, tiled levels at
# downsample 4, 16, 64, ..., a label and a macro image); "pow2": a tiled level at every power of two.
SLIDE_LAYOUTS = ("aperio", "pow2")
DEFAULT_SVS_LAYOUT = "aperio"  # the layout of a .svs when none is asked for (.tif is always "pow2")
LABEL_SIZE = (415, 422)  # width, height of the synthetic label image (an Aperio label's usual size)
_LABEL_PAPER = (250, 250, 247)
_LABEL_INK = (28, 30, 36)
_MACRO_GLASS = (208, 214, 218)  # the slide glass as a macro camera sees it, darker than brightfield white
# A 3 x 5 pixel font for the label's text: each glyph is 5 rows of 3 bits.
_GLYPHS = {
    "0": "111101101101111", "1": "010110010010111", "2": "111001111100111", "3": "111001111001111",
    "4": "101101111001001", "5": "111100111001111", "6": "111100111101111", "7": "111001010010010",
    "8": "111101111101111", "9": "111101111001111", "A": "010101111101101", "C": "111100100100111",
    "D": "110101101101110", "E": "111100111100111", "F": "111100111100100", "G": "111100101101111",
    "H": "101101111101101", "I": "111010010010111", "N": "110101101101101", "S": "111100111001111",
    "T": "111010010010010", "Y": "101101010010010", "-": "000000111000000", " ": "000000000000000",
}


def synthetic_label(seed: int, size: tuple[int, int] = LABEL_SIZE) -> np.ndarray:
    """A plausible slide label, `size` = (width, height): white paper with three lines of block text
    ("FASTGICN", "SYNTHETIC", "SEED <seed>") and a barcode of the seed's bits, in dark ink (uint8 RGB)."""
    w, h = size
    canvas = np.ones((h, w), bool)  # True = paper
    margin = max(2, w // 20)
    lines = ["FASTGICN", "SYNTHETIC", f"SEED {seed}"]
    scale = max(1, min((w - 2 * margin) // (4 * max(map(len, lines))), (h // 2) // (6 * len(lines))))
    y = margin
    for text in lines:
        x = margin
        for char in text:
            glyph = np.array([c == "1" for c in _GLYPHS[char]]).reshape(5, 3)
            block = np.kron(glyph, np.ones((scale, scale), bool))
            canvas[y:y + 5 * scale, x:x + 3 * scale][block[:h - y, :w - x]] = False
            x += 4 * scale
        y += 6 * scale
    # barcode: start bars, then 32 bits of the seed as wide (1) or narrow (0) bars, then stop bars
    bits = [1, 0, 1] + [(seed >> k) & 1 for k in range(31, -1, -1)] + [1, 0, 1]
    module = max(1, (w - 2 * margin) // sum(5 if bit else 3 for bit in bits))  # a bar and its gap
    top, bottom = max(y + margin, h - h // 4 - margin), h - margin
    x = margin
    for bit in bits:
        width = 3 * module if bit else module
        canvas[top:bottom, x:x + width] = False
        x += width + 2 * module
    return np.where(canvas[..., None], np.uint8(_LABEL_PAPER), np.uint8(_LABEL_INK)).astype(np.uint8)


def synthetic_macro(overview: np.ndarray, label: np.ndarray) -> np.ndarray:
    """A macro-camera view: the low-resolution slide `overview` and a reduced `label` side by side on
    slide glass (uint8 RGB; the label at the left end, as on a glass slide)."""
    h, w = overview.shape[:2]
    pad = max(4, h // 10)
    height = h + 2 * pad
    d = max(1, math.ceil(label.shape[0] / (height - 2 * pad)))  # integer box reduction of the label
    lh, lw = label.shape[0] // d, label.shape[1] // d
    small = label[:lh * d, :lw * d].reshape(lh, d, lw, d, 3).astype(np.uint32).sum(axis=(1, 3))
    small = ((small + d * d // 2) // (d * d)).astype(np.uint8)
    macro = np.empty((height, lw + w + 4 * pad, 3), np.uint8)
    macro[:] = np.uint8(_MACRO_GLASS)
    macro[pad:pad + lh, pad:pad + lw] = small
    macro[pad:pad + h, lw + 3 * pad:lw + 3 * pad + w] = overview
    return macro


MIN_SIDE = 64  # smaller than a tissue island: the slide would be all glass


def write_synthetic_slide(out_path, width: int, height: int, seed: int = 0, fmt: str | None = None,
                          tile: int = 256, mpp: float = 0.25, quality: int = 90,
                          min_level_size: int = 1024, layout: str | None = None) -> tuple[Path, Path]:
    """Write a synthetic slide and its ground-truth mask; return (slide_path, mask_path).

    The slide is a pyramidal tiled JPEG TIFF: Aperio-style SVS (ImageDescription with ``AppMag`` = 10 / mpp
    and ``MPP``) for `fmt="aperio"`, a generic tiled TIFF for `fmt="tiff"`; `fmt=None` picks it from the
    suffix (.svs, or .tif/.tiff). `layout="pow2"` writes a tiled level at every power of two until the long
    side is at most `min_level_size`; `layout="aperio"` (SVS only) lays the file out as an Aperio 40x scanner
    does: level 0, a stripped JPEG thumbnail (long side at most 1024 px), tiled levels at downsample 4, 16,
    64, ... (each the 2x reduction of the 2x reduction), a label image (`synthetic_label`, stripped LZW) and
    a macro image (`synthetic_macro`, stripped JPEG). `layout=None` is `DEFAULT_SVS_LAYOUT` for a .svs and
    "pow2" otherwise. The mask, ``<stem>.mask.tif`` beside it, is a pyramidal deflate TIFF aligned to level 0
    with a level at every power of two whatever the layout (0 = normal or glass, 255 = tumour; lower levels
    by 2x2 majority, ties to tumour). Both carry the MPP. Memory stays bounded by a band of tiles however
    large the slide; each file appears under its name only once complete, and if the slide fails its new
    mask is removed.
    """
    out_path = Path(out_path)
    suffix = out_path.suffix.lower()
    if suffix not in SLIDE_SUFFIXES:
        raise ConfigError(f"output {out_path}: unknown suffix {out_path.suffix!r}; name it .svs "
                          "(Aperio-style) or .tif/.tiff (generic tiled TIFF)")
    if fmt is None:
        fmt = SLIDE_SUFFIXES[suffix]
    if fmt not in SLIDE_FORMATS:
        raise ConfigError(f"fmt={fmt!r}: use 'aperio' (SVS) or 'tiff' (generic tiled TIFF), or None to "
                          f"follow the suffix of {out_path.name}")
    if layout is None:
        layout = DEFAULT_SVS_LAYOUT if suffix == ".svs" and fmt == "aperio" else "pow2"
    if layout not in SLIDE_LAYOUTS:
        raise ConfigError(f"layout={layout!r}: use 'aperio' (an Aperio scanner's SVS: levels 1, 4, 16, ... "
                          "with thumbnail, label and macro) or 'pow2' (a level at every power of two)")
    if layout == "aperio" and suffix != ".svs":
        raise ConfigError(f"output {out_path}: layout 'aperio' is an Aperio SVS layout; name the file .svs, "
                          "or use layout 'pow2' for a generic tiled TIFF")
    if layout == "aperio" and fmt != "aperio":
        raise ConfigError(f"output {out_path}: layout 'aperio' needs fmt 'aperio' (or None), not {fmt!r}; "
                          "or use layout 'pow2'")
    for name, value in (("width", width), ("height", height)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < MIN_SIDE:
            raise ConfigError(f"synthetic slide {name}={value!r}: use an integer of at least {MIN_SIDE} px "
                              f"(a slide holds tissue islands of hundreds of pixels), e.g. 20000 x 15000")
    directory = out_path.parent if str(out_path.parent) else Path(".")
    if not directory.is_dir():
        raise SlideError(f"cannot write {out_path}: directory {directory} does not exist; create it first")
    if not os.access(directory, os.W_OK):
        raise SlideError(f"cannot write {out_path}: directory {directory} is not writable; choose another")
    from .outputs.tiff import write_pyramid  # noqa: PLC0415 (keeps `import fastgicn.synth` light)

    slide = SyntheticSlide(width, height, seed, mpp)
    mask_path = mask_path_for(out_path)
    aperio = fmt == "aperio"
    write_pyramid(mask_path, width, height, slide.render_mask, channels=1, tile=tile, compression="deflate",
                  downsample="majority", mpp=mpp, min_level_size=min_level_size,
                  description=f"fastgicn synthetic tumour mask (0 normal or glass, 255 tumour) of "
                              f"{out_path.name}, seed {seed}")
    if aperio:
        description = f"Title = fastgicn synthetic H&E-like slide, seed {seed}"
    else:
        description = f"fastgicn synthetic H&E-like slide (not real tissue), seed {seed}, mpp {mpp}"
    pages = {}
    if layout == "aperio":
        label = synthetic_label(seed)
        pages = dict(level_step=4, thumbnail=True, label=label,
                     macro=lambda overview: synthetic_macro(overview, label))
    try:
        write_pyramid(out_path, width, height, lambda x, y, w, h: slide.render(x, y, w, h)[0], channels=3,
                      tile=tile, compression="jpeg", quality=quality, mpp=mpp, aperio=aperio,
                      app_mag=round(10.0 / mpp, 2) if aperio else None, min_level_size=min_level_size,
                      description=description, **pages)
    except BaseException:
        mask_path.unlink(missing_ok=True)
        raise
    return out_path, mask_path
