"""SyntheticSlide: the tissue layout of a seed and the pixels and tumour mask of any region."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError
from .noise import _Ellipses, _Field, _Noise, _Octave, _rehash, _unit
from .stain import _GLASS, _Nuclei, _stain_lut
from .textures import _RENDER_CHUNK, _TABLE, _blob_texture, _fibre_texture, _window, _wrap_pad

XS_AREA_LIMIT = 50_000  # level-0 pixels: tumour components below this are small (XS), the paper's Table 4

_STRIPE_WIDTH = 2040  # scanner stripe width in level-0 pixels (an Aperio habit)
_NOISE_TABLE = 509  # period of the scanner noise (prime, so it never lines up with tiles)


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
