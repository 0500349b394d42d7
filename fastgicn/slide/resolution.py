"""Which pixels the network sees: a stored pyramid level, or a finer level reduced to the target resolution.

A `Resolution` names a grid of pixels over the slide: `level` is the stored level read, `factor` how many of
its pixels make one output pixel along each axis (1: the level as stored), `downsample` the level-0 pixels per
output pixel and `dimensions` the output size. `resolution_for(slide, target_mpp=... | magnification=...)`
chooses it:

1. a level within `tolerance` (15 %) of the target is read as it is (the closest if several are);
2. otherwise the coarsest level finer than the target is read and reduced: by an exact integer box mean when
   an integer factor lands within the tolerance (Aperio 40x pyramids have levels at 1, 4, 16: 0.5 um/px is
   level 0 reduced 2x), else by the exact area average for the fractional factor (see `area_reduce`);
3. a target finer than level 0 (beyond the tolerance) is refused: nothing is upsampled.

Geometry of a reduced resolution: output pixel (i, j) covers level pixels [lvl_x0 + j f, lvl_x0 + (j + 1) f)
x [lvl_y0 + i f, ...) where lvl_x0 = l0_x / level_downsample is the region's origin in the read level
(rounded to a level pixel for integer factors, exact for fractional ones); beyond the slide is white and
counts in the mean as white.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError

__all__ = ["Resolution", "resolution_for", "resolution_at", "stored", "area_reduce", "MAGNIFICATION_MPP_40X"]

# The paper works at 40x; scanners put 40x at about 0.25 um/px (Aperio 0.2527, Hamamatsu 0.2265).
MAGNIFICATION_MPP_40X = 0.25
# A reduction is exact when the factor is within this of an integer (it is then rounded to it).
_INTEGER_SLACK = 1e-3


@dataclass(frozen=True)
class Resolution:
    """`factor` x `factor` pixels of stored `level` per output pixel (see the module docstring)."""

    level: int
    factor: float = 1.0
    level_downsample: float = 1.0
    level_dimensions: tuple[int, int] = (0, 0)

    @property
    def integer_factor(self) -> int | None:
        """The factor as an int when the reduction is an exact box mean (1 when nothing is reduced)."""
        r = round(self.factor)
        return int(r) if r >= 1 and abs(self.factor - r) < _INTEGER_SLACK else None

    @property
    def reduced(self) -> bool:
        return self.integer_factor != 1

    @property
    def downsample(self) -> float:
        """Level-0 pixels per output pixel."""
        return self.level_downsample * self.factor

    @property
    def dimensions(self) -> tuple[int, int]:
        w, h = self.level_dimensions
        if not self.reduced:
            return (int(w), int(h))
        return (max(1, math.ceil(w / self.factor - 1e-9)), max(1, math.ceil(h / self.factor - 1e-9)))

    def to_dict(self, slide_mpp: float | None = None) -> dict:
        return {"level": self.level, "level_downsample": self.level_downsample,
                "reduction": self.integer_factor or round(self.factor, 6),
                "reduction_filter": None if not self.reduced else
                ("box mean" if self.integer_factor else "area average"),
                "downsample": self.downsample, "dimensions": list(self.dimensions),
                "mpp": None if slide_mpp is None else slide_mpp * self.downsample}


def stored(slide, level: int) -> Resolution:
    """The stored `level` of `slide`, read as it is."""
    level = slide._check_level(level)
    return Resolution(level, 1.0, float(slide.level_downsamples[level]), tuple(slide.level_dimensions[level]))


def resolution_for(slide, target_mpp: float | None = None, *, magnification: float | None = None,
                   tolerance: float = 0.15) -> Resolution:
    """The pixels to read for a target resolution, in microns per pixel or as a magnification (see the module
    docstring). Raises ConfigError when the slide cannot place the target or it is finer than level 0."""
    wanted, what = _wanted_downsample(slide, target_mpp, magnification, tolerance)
    return resolution_at(slide, wanted, tolerance=tolerance, what=what)


def resolution_at(slide, downsample: float, *, tolerance: float = 0.15, what: str | None = None) -> Resolution:
    """The pixels at `downsample` level-0 pixels per pixel (see `resolution_for`; `what` names the target in
    messages)."""
    wanted = float(downsample)
    what = what or f"downsample {wanted:g}"
    downsamples = [float(d) for d in slide.level_downsamples]
    errors = [abs(ds / wanted - 1.0) for ds in downsamples]
    best = int(np.argmin(errors))
    if errors[best] <= tolerance:
        return stored(slide, best)
    finer = [i for i, ds in enumerate(downsamples) if ds < wanted]
    if not finer:
        have = ", ".join(f"level {i}: downsample {ds:g}" + (f" ({slide.mpp * ds:.3g} um/px)" if slide.mpp else "")
                         for i, ds in enumerate(downsamples))
        raise ConfigError(f"{slide.name}: {what} needs downsample {wanted:.3g} of level 0, finer than level 0 "
                          f"(fastgicn does not upsample). Levels: {have}. Choose a coarser target (--target-mpp) "
                          "or a level (--level)")
    level = max(finer, key=lambda i: downsamples[i])
    factor = wanted / downsamples[level]
    r = round(factor)
    if r >= 2 and abs(r / factor - 1.0) <= tolerance:
        factor = float(r)
    return Resolution(level, factor, downsamples[level], tuple(slide.level_dimensions[level]))


def _wanted_downsample(slide, target_mpp, magnification, tolerance) -> tuple[float, str]:
    if (target_mpp is None) == (magnification is None):
        raise ConfigError("give exactly one of target_mpp (microns per pixel, 40x is about 0.25) or "
                          "magnification (e.g. 40)")
    if not 0 <= tolerance < 1:
        raise ConfigError(f"tolerance={tolerance!r}: use a relative tolerance in [0, 1)")
    if magnification is not None:
        if not magnification > 0:
            raise ConfigError(f"magnification={magnification!r}: use a positive number such as 40")
        if slide.objective_power:
            return (slide.objective_power / magnification,
                    f"{magnification:g}x (the slide is scanned at {slide.objective_power:g}x)")
        if slide.mpp is not None:
            as_mpp = MAGNIFICATION_MPP_40X * 40.0 / magnification
            return as_mpp / slide.mpp, (f"{magnification:g}x (taken as {as_mpp:g} um/px; the slide records "
                                        "no objective power)")
        raise ConfigError(f"{slide.name}: the slide records neither objective power nor a plausible MPP, so "
                          f"magnification {magnification:g}x cannot be placed; give its MPP (--mpp, or "
                          "open_slide(..., mpp=)) or choose a level (--level, TileConfig(level=))")
    if not target_mpp > 0:
        raise ConfigError(f"target_mpp={target_mpp!r}: use microns per pixel > 0 (40x is about 0.25)")
    if slide.mpp is None:
        if getattr(slide, "mpp_note", None):
            raise ConfigError(f"{slide.mpp_note} (target_mpp={target_mpp:g} cannot be placed without it)")
        raise ConfigError(f"{slide.name}: the slide records no plausible microns per pixel, so target_mpp="
                          f"{target_mpp:g} cannot be placed; give its MPP (--mpp, or open_slide(..., mpp=)) or "
                          "choose a level (--level, TileConfig(level=))")
    return target_mpp / slide.mpp, f"{target_mpp:g} um/px"


def area_span(origin: float, n: int, factor: float) -> tuple[int, int]:
    """Integer source pixels [start, stop) covering output pixels 0..n of a fractional reduction at `origin`."""
    start = math.floor(origin + 1e-9)
    stop = math.ceil(origin + n * factor - 1e-9)
    return start, max(stop, start + 1)


def _axis_weights(origin: float, start: int, n: int, factor: float, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Per output pixel along one axis: the first source pixel it touches (relative to `start`) and the
    fractions of [origin + j f, origin + (j + 1) f) each of the next k source pixels covers, over f."""
    k = int(np.ceil(factor)) + 1
    lo = origin - start + np.arange(n) * factor
    first = np.floor(lo + 1e-12).astype(np.int64)
    px = first[:, None] + np.arange(k)[None, :]
    cover = np.minimum(lo[:, None] + factor, px + 1) - np.maximum(lo[:, None], px)
    weights = np.clip(cover, 0, None) / factor
    weights[px >= size] = 0.0
    return np.clip(first, 0, None), weights


def area_reduce(src: np.ndarray, origin_x: float, origin_y: float, start_x: int, start_y: int, factor: float,
                out: np.ndarray, threshold: int = 220) -> int:
    """Exact area average of `src` (source pixels from (start_y, start_x), RGB uint8) into `out` (h, w, 3):
    output pixel (i, j) is the mean of the source over [origin_x + j f, origin_x + (j + 1) f) x [origin_y +
    i f, ...), partial pixels weighted by their covered fraction, rounded half up. Separable weights in
    NumPy, the sums in a Cython loop (`_tiler.area_reduce_u8`, GIL released). Returns the background count."""
    from .. import _tiler

    h, w = out.shape[:2]
    x0, wx = _axis_weights(origin_x, start_x, w, factor, src.shape[1])
    y0, wy = _axis_weights(origin_y, start_y, h, factor, src.shape[0])
    return _tiler.area_reduce_u8(src, out, x0, wx, y0, wy, threshold)
