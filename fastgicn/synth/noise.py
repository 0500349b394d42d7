"""Integer hashing, value noise and the region fields of a synthetic slide.

Every noise term is an integer below 2**53 in float64 (or 2**23 in float32 when coarse), so a field has the
same value at a pixel whichever region, tiling or order computes it (see the package docstring).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# Fixed-point scale of the region fields: a field value of 1.0 is _SCALE. Lattice values are in [-1024, 1024),
# bilinear weights in [0, 256] per axis, amplitudes per mille: every noise term is an integer below 2**53.
_LATTICE = 1024
_WEIGHT = 256
_SCALE = 1000.0 * _LATTICE * _WEIGHT * _WEIGHT


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
