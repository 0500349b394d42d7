"""The `Slide` interface every reader implements, and its generic methods.

Geometry: `read_region(l0_x, l0_y, level, w, h)` takes the origin in level-0 pixels and the size in
pixels of `level` (OpenSlide's convention). Whatever lies outside the slide is white. Subclasses fill in the
geometry and `_read` (one stored level, no reduction); `read_into` adds the checks, the reduction to a
`Resolution` (fastgicn.slide.resolution) and the life cycle around it.

Choosing a level: `level_for(target_mpp=...)` or `level_for(magnification=...)` returns the pyramid
level whose resolution is within `tolerance` (15 %) of the target. Nothing is resampled: a target
between levels or finer than level 0 raises `ConfigError` naming the levels there are, because a
resize per tile costs time and changes what the network sees (train on the level you infer on).
Magnification uses the objective power when the slide records it, else the convention 40x = 0.25 um/px.
`resolution_for` says how a finer level is reduced to the target instead.

Thread safety: `read_region`, `read_into` and every property may be called from many threads at once.
`close()` waits for reads in flight, then releases the file; a read after `close()` raises `SlideError`.

Also here, shared by the readers: the MPP plausibility rule and the "unsupported compression" error.
"""
from __future__ import annotations

import math
import re
import threading

import numpy as np

from .. import _tiler
from ..config import PAPER_WHITE_THRESHOLD
from ..errors import ConfigError, SlideError

__all__ = ["Slide", "MAX_LEVEL_PIXELS", "PLAUSIBLE_MPP", "plausible_mpp"]

# read_level refuses levels larger than this unless told otherwise (it returns one array).
MAX_LEVEL_PIXELS = 1 << 28
# Per-thread scratch buffers up to this many pixels are kept between reads; larger ones are fresh.
_SCRATCH_KEEP = 1 << 22


class Slide:
    """What every slide offers. Subclasses fill in the geometry and `_read`.

    Attributes: `path` (str or None for arrays), `name` (for messages and output names), `vendor`,
    `dimensions` (level-0 width, height), `level_count`, `level_dimensions`, `level_downsamples`,
    `mpp` (level-0 microns per pixel, the mean of x and y, or None), `mpp_xy`, `objective_power`
    (or None), `properties` (a dict of the format's metadata).
    """

    path: str | None
    name: str
    vendor: str
    reader: str = "base"           # who decodes the pixels: "direct", "openslide", "image" or "array"
    reader_note: str | None = None  # why the direct reader does not serve this slide, when it does not
    mpp_note: str | None = None     # why a resolution the file records was not taken as its MPP
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    mpp_xy: tuple[float, float] | None
    objective_power: float | None
    properties: dict[str, str]

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._inflight = 0
        self._closed = False
        self._last_downsampled: tuple[int, np.ndarray] | None = None

    # -- geometry ------------------------------------------------------------------------------
    @property
    def dimensions(self) -> tuple[int, int]:
        return self.level_dimensions[0]

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    @property
    def mpp(self) -> float | None:
        return None if self.mpp_xy is None else (self.mpp_xy[0] + self.mpp_xy[1]) / 2.0

    def level_mpp(self, level: int) -> float | None:
        self._check_level(level)
        return None if self.mpp is None else self.mpp * self.level_downsamples[level]

    def best_level_for_downsample(self, downsample: float) -> int:
        """The level with the largest downsample not above `downsample` (OpenSlide's rule); 0 if none."""
        if not downsample > 0:
            raise ConfigError(f"downsample={downsample!r}: use a positive number")
        best = 0
        for level, ds in enumerate(self.level_downsamples):
            if ds <= downsample * (1 + 1e-6):
                best = level
        return best

    def level_for(self, target_mpp: float | None = None, *, magnification: float | None = None,
                  tolerance: float = 0.15) -> int:
        """The stored level within `tolerance` (relative) of a target resolution, in microns per pixel or as
        a magnification (the closest if several are). Raises ConfigError when no level is; `resolution_for`
        then says how a finer level is reduced to the target."""
        from .resolution import _wanted_downsample, resolution_at

        wanted, what = _wanted_downsample(self, target_mpp, magnification, tolerance)
        res = resolution_at(self, wanted, tolerance=tolerance, what=what)
        if not res.reduced:
            return res.level
        have = ", ".join(f"level {i}: downsample {ds:g}" + (f" ({self.mpp * ds:.3g} um/px)" if self.mpp else "")
                         for i, ds in enumerate(self.level_downsamples))
        raise ConfigError(f"{self.name}: no level within {tolerance:.0%} of {what}, which needs downsample "
                          f"{wanted:.4g}; levels: {have}. resolution_for() reads it as level {res.level} reduced "
                          f"{res.factor:g}x")

    def resolution_for(self, target_mpp: float | None = None, *, magnification: float | None = None,
                       tolerance: float = 0.15):
        """The `Resolution` to read for a target: a stored level, or a finer level reduced (see
        fastgicn.slide.resolution)."""
        from .resolution import resolution_for

        return resolution_for(self, target_mpp, magnification=magnification, tolerance=tolerance)

    def _check_level(self, level: int) -> int:
        if isinstance(level, (bool, np.bool_)) or not isinstance(level, (int, np.integer)) or \
                not 0 <= level < self.level_count:
            raise ConfigError(f"level={level!r}: {self.name} has levels 0..{self.level_count - 1}")
        return int(level)

    # -- reading ------------------------------------------------------------------------------
    def read_region(self, l0_x: int, l0_y: int, level: int, w: int, h: int,
                    out: np.ndarray | None = None) -> np.ndarray:
        """RGB uint8 (h, w, 3) of the region whose top-left corner is (l0_x, l0_y) in level-0 pixels,
        `w` x `h` pixels of `level`. Outside the slide is white. `out`, if given, receives the pixels
        (shape (h, w, 3) uint8 with packed pixels, e.g. `batch[i]`) and is returned."""
        if out is None:
            w, h = _check_size(w, h)
            out = np.empty((h, w, 3), np.uint8)
        elif out.shape[:2] != (h, w):
            raise ConfigError(f"out has shape {getattr(out, 'shape', None)} but the region is {h} x {w}")
        self.read_into(out, l0_x, l0_y, level)
        return out

    def read_into(self, out: np.ndarray, l0_x: int, l0_y: int, level=0,
                  white_threshold: int = PAPER_WHITE_THRESHOLD) -> int:
        """Read the region of `out`'s size ((h, w, 3) uint8, packed pixels) at (l0_x, l0_y) of `level`
        into `out`, and return the number of its pixels whose R, G and B are all > `white_threshold`
        (background; the padding beyond the slide counts as background).

        `level` is a level index or a `Resolution` (a level reduced by a factor, see
        fastgicn.slide.resolution): the reduction runs in the same pass that counts background."""
        from .resolution import Resolution

        res = level if isinstance(level, Resolution) else None
        level = self._check_level(res.level if res is not None else level)
        if res is not None and not res.reduced:
            res = None
        if not isinstance(out, np.ndarray) or out.dtype != np.uint8 or out.ndim != 3 or out.shape[2] != 3:
            raise ConfigError(f"out must be a uint8 (h, w, 3) array, got "
                              f"{getattr(out, 'dtype', type(out).__name__)} {getattr(out, 'shape', '')}")
        if (out.shape[1] > 1 and out.strides[1] != 3) or out.strides[2] != 1 or not out.flags.writeable:
            raise ConfigError(f"out (strides {out.strides}) must be writeable with packed pixels and channels "
                              "(strides (any, 3, 1)), e.g. batch[i] or batch[i, y0:y1, x0:x1]")
        l0_x, l0_y = _check_int(l0_x, "l0_x"), _check_int(l0_y, "l0_y")
        if out.shape[0] == 0 or out.shape[1] == 0:
            return 0
        with self._reading():
            if res is not None:
                return self._read_reduced(out, l0_x, l0_y, res, white_threshold)
            return self._read(out, l0_x, l0_y, level, white_threshold)

    def _scratch_rgb(self, h: int, w: int) -> np.ndarray:
        """A per-thread (h, w, 3) uint8 buffer for the finer pixels of a reduced read."""
        local = self.__dict__.get("_scratch_local")
        if local is None:
            local = self.__dict__.setdefault("_scratch_local", threading.local())
        n = h * w * 3
        buf = getattr(local, "rgb", None)
        if buf is None or buf.size < n:
            buf = np.empty(n, np.uint8)
            if n <= 3 * _SCRATCH_KEEP:
                local.rgb = buf
        return buf[:n].reshape(h, w, 3)

    def _read_reduced(self, out: np.ndarray, l0_x: int, l0_y: int, res, threshold: int) -> int:
        h, w = out.shape[:2]
        r = res.integer_factor
        if r is not None:  # exact box mean, fused with the background count
            src = self._scratch_rgb(h * r, w * r)
            self._read(src, l0_x, l0_y, res.level, 255)
            return _tiler.box_reduce(src, out, r, threshold)
        from .resolution import area_reduce, area_span

        ox, oy = l0_x / res.level_downsample, l0_y / res.level_downsample
        x0, x1 = area_span(ox, w, res.factor)
        y0, y1 = area_span(oy, h, res.factor)
        src = self._scratch_rgb(y1 - y0, x1 - x0)
        self._read(src, int(round(x0 * res.level_downsample)), int(round(y0 * res.level_downsample)), res.level, 255)
        return area_reduce(src, ox, oy, x0, y0, res.factor, out, threshold)

    def _read(self, out: np.ndarray, l0_x: int, l0_y: int, level: int, threshold: int) -> int:
        raise NotImplementedError

    def read_level(self, level: int, max_pixels: int = MAX_LEVEL_PIXELS) -> np.ndarray:
        """A whole level as one RGB array (refuses more than `max_pixels`: use read_region in tiles)."""
        level = self._check_level(level)
        w, h = self.level_dimensions[level]
        if w * h > max_pixels:
            raise ConfigError(f"{self.name}: level {level} is {w} x {h} pixels, more than max_pixels="
                              f"{max_pixels}; read a smaller level (thumbnail) or read it in regions")
        return self.read_region(0, 0, level, w, h)

    def downsampled(self, factor: int) -> np.ndarray:
        """The slide shrunk by an integer `factor` from level 0: (ceil(H / f), ceil(W / f), 3) uint8, pixel
        (i, j) covering level-0 pixels [i f, (i + 1) f) x [j f, (j + 1) f) (white beyond the edge).

        Read from the best pyramid level for `factor` (the coarsest not above it, or one at most 1 % above it),
        never from level 0 unless the pyramid has nothing coarser; the remaining factor is a box (mean) filter,
        or a PIL box resize when not an integer. The result is read-only: the last one is kept, because the
        tissue mask and the overlay of a slide usually ask for the same factor."""
        if isinstance(factor, bool) or not isinstance(factor, (int, np.integer)) or factor < 1:
            raise ConfigError(f"factor={factor!r}: use an integer >= 1")
        factor = int(factor)
        last = self._last_downsampled
        if last is not None and last[0] == factor:
            return last[1]
        out = self._downsampled(factor)
        out.flags.writeable = False
        self._last_downsampled = (factor, out)
        return out

    def _downsampled(self, factor: int) -> np.ndarray:
        w0, h0 = self.dimensions
        nw, nh = -(-w0 // factor), -(-h0 // factor)
        level = self.best_level_for_downsample(factor)
        # a level a hair coarser than asked serves too: scanners store 16x as 16.02x, and the next finer level
        # (4x) would mean reading 16 times the pixels for a thumbnail or a tissue mask
        close = [i for i, d in enumerate(self.level_downsamples) if factor < d <= factor * 1.01]
        if close:
            level = close[0]
        ds = self.level_downsamples[level]
        rest = factor / ds
        r = int(round(rest))
        if abs(rest - r) < 1e-3 and r >= 1:
            out = np.empty((nh, nw, 3), np.uint8)
            rows = max(1, (1 << 20) // max(1, nw * r * r))   # output rows per band: ~1 Mpx read at once
            for i0 in range(0, nh, rows):
                i1 = min(nh, i0 + rows)
                band = self.read_region(0, int(round(i0 * factor)), level, nw * r, (i1 - i0) * r)
                if r == 1:
                    out[i0:i1] = band
                elif r <= 64:  # exact box mean, rounded half up, in C: 10x NumPy's reshape-and-sum
                    _tiler.box_reduce(band, out[i0:i1], r, 255)
                else:
                    blocks = band.reshape(i1 - i0, r, nw, r, 3).astype(np.uint32).sum(axis=(1, 3))
                    out[i0:i1] = (blocks + (r * r) // 2) // (r * r)
            return out
        from PIL import Image
        lw, lh = int(math.ceil(nw * rest)), int(math.ceil(nh * rest))
        region = self.read_region(0, 0, level, lw, lh)
        small = Image.fromarray(region).resize((nw, nh), Image.BOX, box=(0, 0, nw * rest, nh * rest))
        return np.array(small)

    def thumbnail(self, max_side: int = 1024) -> np.ndarray:
        """A small RGB image of the whole slide, at most `max_side` pixels on its longer side, read from
        a low level (integer downsample of level 0; see `downsampled`)."""
        if not isinstance(max_side, (int, np.integer)) or max_side < 1:
            raise ConfigError(f"max_side={max_side!r}: use a positive integer")
        factor = max(1, -(-max(self.dimensions) // int(max_side)))
        return self.downsampled(factor)

    # -- life cycle -----------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._closed

    class _Reading:
        __slots__ = ("slide",)

        def __init__(self, slide: "Slide") -> None:
            self.slide = slide

        def __enter__(self) -> None:
            s = self.slide
            with s._cond:
                if s._closed:
                    raise SlideError(f"{s.name}: the slide is closed; open it again to read")
                s._inflight += 1

        def __exit__(self, *exc) -> None:
            s = self.slide
            with s._cond:
                s._inflight -= 1
                if s._inflight == 0:
                    s._cond.notify_all()

    def _reading(self) -> "Slide._Reading":
        return Slide._Reading(self)

    def close(self) -> None:
        """Wait for reads in flight, then release the file. Idempotent."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            while self._inflight:
                self._cond.wait()
        self._last_downsampled = None
        self._release()

    def _release(self) -> None:
        pass

    def __enter__(self) -> "Slide":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            if not self._closed:
                self._closed = True
                self._release()
        except Exception:
            pass

    def __repr__(self) -> str:
        mpp = f", mpp={self.mpp:.4g}" if self.mpp else ""
        w, h = self.dimensions
        return f"{type(self).__name__}({self.name!r}, {self.vendor}, {w}x{h}, levels={self.level_count}{mpp})"


# ---------------------------------------------------------------------------------------------------
# Helpers shared by the readers


# Microns per pixel a microscope slide can have. A 72-dpi placeholder is 353 um/px, 300 dpi 85 um/px; a 1.25x
# scan is about 8 um/px.
PLAUSIBLE_MPP = (0.01, 50.0)


def plausible_mpp(x: float, y: float) -> bool:
    lo, hi = PLAUSIBLE_MPP
    return all(math.isfinite(v) and lo <= v <= hi for v in (x, y))


def _mpp_override(mpp: float | None) -> tuple[float, float] | None:
    return None if mpp is None else (float(mpp), float(mpp))


_UNSUPPORTED_COMPRESSION = re.compile(r"unsupported (?:tiff )?compression\W*(\d+)", re.IGNORECASE)


def _compression_name(code: int) -> str:
    import tifffile

    try:
        return tifffile.COMPRESSION(code).name.lower()
    except ValueError:
        return "unknown code"


def _compression_error(path: str, message, reader: str = "OpenSlide") -> SlideError | None:
    """The SlideError for a reader's "unsupported compression N" (not a damaged file: copying it again will not
    help); None when `message` is about something else."""
    found = _UNSUPPORTED_COMPRESSION.search(str(message))
    if not found:
        return None
    code = int(found.group(1))
    return SlideError(f"{path}: TIFF compression {code} ({_compression_name(code)}) is not supported by {reader}: "
                      f"convert the slide with `vips tiffsave '{path}' converted.tif --tile --pyramid --bigtiff "
                      "--compression jpeg --Q 90` (or --compression deflate, lossless) and segment the converted "
                      "file")


def _check_int(v, name: str) -> int:
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
        raise ConfigError(f"{name}={v!r}: use an integer number of pixels")
    return int(v)


def _check_size(w, h) -> tuple[int, int]:
    w, h = _check_int(w, "w"), _check_int(h, "h")
    if w < 0 or h < 0:
        raise ConfigError(f"region size {w} x {h}: width and height must be >= 0")
    return w, h
