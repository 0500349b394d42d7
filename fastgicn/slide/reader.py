"""One reading interface over OpenSlide slides, plain images and NumPy arrays.

`open_slide(path_or_array, mpp=None)` returns a `Slide`:

- `OpenSlideSlide` for every format OpenSlide reads (Aperio SVS, generic tiled TIFF, NDPI, MRXS, ...).
  Regions are read straight into a NumPy uint32 buffer through libopenslide's `openslide_read_region`
  (ctypes releases the GIL for the call) and converted by the Cython tiler in one pass: premultiplied
  ARGB to RGB composited on white, written where the caller wants it (a batch slot, say).
- `ImageSlide` for plain TIFF (tifffile; memory-mapped when uncompressed), PNG and JPEG (PIL), and for
  H x W x 3 uint8 arrays a scanner pipeline hands over. One level.

Geometry: `read_region(l0_x, l0_y, level, w, h)` takes the origin in level-0 pixels and the size in
pixels of `level` (OpenSlide's convention). Whatever lies outside the slide is white.

Choosing a level: `level_for(target_mpp=...)` or `level_for(magnification=...)` returns the pyramid
level whose resolution is within `tolerance` (15 %) of the target. Nothing is resampled: a target
between levels or finer than level 0 raises `ConfigError` naming the levels there are, because a
resize per tile costs time and changes what the network sees (train on the level you infer on).
Magnification uses the objective power when the slide records it, else the convention 40x = 0.25 um/px.

Errors: a missing file, a directory, an unsupported or corrupt file, a truncated slide, a read that
fails: `SlideError` naming the file, the reason and what to do. Bad arguments: `ConfigError`.

Thread safety: `read_region`, `read_into` and every property may be called from many threads at once.
OpenSlide is thread-safe on one handle; by default threads share it (`handles="shared"`), and
`handles="per_thread"` gives each thread its own handle (its own tile cache and TIFF state, no
contention on the handle's locks) at the cost of one open per thread; use it with a pool of long-lived
threads, since a handle stays open until `close()` even after its thread ends. `close()` waits for reads in
flight, then releases every handle; a read after `close()` raises `SlideError`.
"""
from __future__ import annotations

import ctypes
import logging
import math
import os
import re
import threading
from pathlib import Path
from typing import Iterator

import numpy as np

from .. import _tiler
from ..config import PAPER_WHITE_THRESHOLD
from ..errors import ConfigError, SlideError

__all__ = ["Slide", "OpenSlideSlide", "ImageSlide", "open_slide", "MAGNIFICATION_MPP_40X"]

# The paper works at 40x; scanners put 40x at about 0.25 um/px (Aperio 0.2527, Hamamatsu 0.2265).
MAGNIFICATION_MPP_40X = 0.25
# Plain (single-level) images are loaded into memory unless memory-mappable; refuse beyond this many
# pixels (3 GiB of RGB) and point to a pyramidal TIFF instead.
MAX_PLAIN_IMAGE_PIXELS = 1 << 30
# read_level refuses levels larger than this unless told otherwise (it returns one array).
MAX_LEVEL_PIXELS = 1 << 28

_SCRATCH_KEEP = 1 << 22
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_PIL_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}


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
        area_reduce(src, ox, oy, x0, y0, res.factor, out)
        return int(np.count_nonzero((out > threshold).all(axis=2)))

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

        Read from the best pyramid level for `factor`, never from level 0 unless the pyramid has nothing
        coarser; the remaining factor is a box (mean) filter, or a PIL box resize when not an integer."""
        if isinstance(factor, bool) or not isinstance(factor, (int, np.integer)) or factor < 1:
            raise ConfigError(f"factor={factor!r}: use an integer >= 1")
        factor = int(factor)
        w0, h0 = self.dimensions
        nw, nh = -(-w0 // factor), -(-h0 // factor)
        level = self.best_level_for_downsample(factor)
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
                else:
                    blocks = band.reshape(i1 - i0, r, nw, r, 3).astype(np.uint32).sum(axis=(1, 3))
                    out[i0:i1] = (blocks + (r * r) // 2) // (r * r)
            return out
        from PIL import Image
        lw, lh = int(math.ceil(nw * rest)), int(math.ceil(nh * rest))
        region = self.read_region(0, 0, level, lw, lh)
        small = Image.fromarray(region).resize((nw, nh), Image.BOX, box=(0, 0, nw * rest, nh * rest))
        return np.asarray(small)

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
# OpenSlide


class OpenSlideSlide(Slide):
    """A slide read by libopenslide (see the module docstring for threads and errors)."""

    reader = "openslide"

    def __init__(self, path: str, vendor: str, mpp: float | None = None, handles: str = "shared") -> None:
        super().__init__()
        import openslide.lowlevel as ll

        self._ll = ll
        self.path = path
        self.name = os.path.basename(path)
        self.vendor = vendor
        if handles not in ("shared", "per_thread"):
            raise ConfigError(f"handles={handles!r}: use 'shared' or 'per_thread'")
        self._per_thread = handles == "per_thread"
        self._handles: list = []
        self._handles_lock = threading.Lock()
        self._local = threading.local()
        self._handle = self._open_handle()
        try:
            osr = self._handle
            self.level_dimensions = tuple(tuple(int(v) for v in ll.get_level_dimensions(osr, i))
                                          for i in range(ll.get_level_count(osr)))
            self.level_downsamples = tuple(float(ll.get_level_downsample(osr, i))
                                           for i in range(len(self.level_dimensions)))
            self.properties = {k: ll.get_property_value(osr, k) for k in ll.get_property_names(osr)}
        except ll.OpenSlideError as exc:
            self._release()
            raise _compression_error(path, exc) or SlideError(
                f"{path}: OpenSlide cannot read the slide's metadata ({exc}); the file is "
                "probably corrupt or truncated: copy it again from the scanner") from None
        if not self.level_dimensions or self.level_dimensions[0][0] <= 0 or self.level_dimensions[0][1] <= 0:
            self._release()
            raise SlideError(f"{path}: OpenSlide reports no image data; the file is corrupt or empty")
        file_mpp, self.mpp_note = _props_mpp(self.properties, path)
        self.mpp_xy = _mpp_override(mpp) or file_mpp
        try:
            power = float(self.properties.get("openslide.objective-power", "nan"))
            self.objective_power = power if math.isfinite(power) and power > 0 else None
        except ValueError:
            self.objective_power = None

    # one handle per thread on request; the first handle doubles as the main thread's
    def _open_handle(self):
        ll = self._ll
        try:
            osr = ll.open(self.path)
        except ll.OpenSlideUnsupportedFormatError:
            raise SlideError(f"{self.path}: OpenSlide does not support this file (vendor detected: "
                             f"{self.vendor}); it may be corrupt or truncated") from None
        except ll.OpenSlideError as exc:
            raise _compression_error(self.path, exc) or SlideError(
                f"{self.path}: OpenSlide cannot open the slide: {exc}. The file is probably "
                "truncated or corrupt: copy it again from the scanner") from None
        with self._handles_lock:
            self._handles.append(osr)
        return osr

    def _thread_handle(self):
        if not self._per_thread:
            return self._handle
        osr = getattr(self._local, "osr", None)
        if osr is None:
            main = threading.current_thread() is threading.main_thread()
            osr = self._handle if main else self._open_handle()
            self._local.osr = osr
        return osr

    def _scratch(self, n: int) -> np.ndarray:
        """A per-thread ARGB buffer, kept for tile-sized reads (up to 4 Mpx) and fresh for larger ones."""
        if n > _SCRATCH_KEEP:
            return np.empty(n, np.uint32)
        buf = getattr(self._local, "buf", None)
        if buf is None or buf.size < n:
            buf = np.empty(max(n, 1 << 18), np.uint32)
            self._local.buf = buf
        return buf

    def _read(self, out: np.ndarray, l0_x: int, l0_y: int, level: int, threshold: int) -> int:
        h, w = out.shape[:2]
        buf = self._scratch(h * w)[: h * w].reshape(h, w)
        ll = self._ll
        try:
            ll._read_region(self._thread_handle(), buf.ctypes.data_as(ctypes.POINTER(ctypes.c_uint32)),
                            l0_x, l0_y, level, w, h)
        except ll.OpenSlideError as exc:
            raise _compression_error(self.path, exc) or SlideError(
                f"{self.path}: reading {w}x{h} at level {level} from ({l0_x}, {l0_y}) failed: "
                             f"{exc}. The file is probably truncated or corrupt: copy it again from the "
                             "scanner") from None
        except (ValueError, ctypes.ArgumentError) as exc:
            raise SlideError(f"{self.path}: OpenSlide refused the read ({exc})") from None
        return _tiler.argb_to_rgb(buf, out, threshold)

    def _release(self) -> None:
        with self._handles_lock:
            handles, self._handles = self._handles, []
        for osr in handles:
            try:
                self._ll.close(osr)
            except Exception:
                pass


# ---------------------------------------------------------------------------------------------------
# Plain images and arrays


class ImageSlide(Slide):
    """A single-level RGB image held as a NumPy array (in memory or memory-mapped)."""

    reader = "image"

    def __init__(self, rgb: np.ndarray, name: str, path: str | None = None, vendor: str = "array",
                 mpp: float | tuple[float, float] | None = None, properties: dict | None = None) -> None:
        super().__init__()
        self._rgb = rgb
        self.path = path
        self.name = name
        self.vendor = vendor
        h, w = rgb.shape[:2]
        self.level_dimensions = ((int(w), int(h)),)
        self.level_downsamples = (1.0,)
        if isinstance(mpp, tuple):
            self.mpp_xy = mpp
        else:
            self.mpp_xy = None if mpp is None else (float(mpp), float(mpp))
        self.objective_power = None
        self.properties = dict(properties or {})
        if path is None:
            self.reader = "array"

    def _read(self, out: np.ndarray, l0_x: int, l0_y: int, level: int, threshold: int) -> int:
        h, w = out.shape[:2]
        W, H = self.dimensions
        x0, y0 = max(l0_x, 0), max(l0_y, 0)
        x1, y1 = min(l0_x + w, W), min(l0_y + h, H)
        if x1 <= x0 or y1 <= y0:
            crop = self._rgb[0:0, 0:0]
        else:
            crop = self._rgb[y0:y1, x0:x1]
        try:
            return _tiler.to_slot(crop, out[None], 0, max(0, y0 - l0_y) if crop.size else 0,
                                  max(0, x0 - l0_x) if crop.size else 0, threshold)
        except OSError as exc:   # a memory-mapped file that shrank underneath us
            raise SlideError(f"{self.path or self.name}: reading failed ({exc}); the file may have been "
                             "truncated while open") from None

    def _release(self) -> None:
        rgb, self._rgb = self._rgb, None
        mm = getattr(rgb, "_mmap", None)
        del rgb
        if mm is not None:
            try:
                mm.close()
            except Exception:   # other views still alive; the GC will close it
                pass


# ---------------------------------------------------------------------------------------------------
# Opening


def open_slide(path_or_array, mpp: float | None = None, *, handles: str = "shared", reader: str = "auto") -> Slide:
    """Open a slide file (OpenSlide formats, plain TIFF/PNG/JPEG) or wrap an H x W x 3 uint8 array.

    `mpp` (microns per pixel of level 0) overrides what the file says, or supplies it for images and
    arrays that do not carry it. `reader`: "auto" reads tiled SVS and generic TIFF slides directly
    (fastgicn.slide.direct: tiles by offset, decoded by imagecodecs) and everything else through OpenSlide;
    "openslide" always uses OpenSlide; "direct" raises SlideError when the direct reader cannot serve the
    file. The slide's `reader` says which one reads it and `reader_note` why the direct one does not.
    `handles` ("shared" or "per_thread") only matters for OpenSlide slides.
    Raises SlideError for anything that cannot be read, naming the file and the reason.
    """
    if reader not in ("auto", "direct", "openslide"):
        raise ConfigError(f"reader={reader!r}: use 'auto', 'direct' or 'openslide'")
    if mpp is not None and not (isinstance(mpp, (int, float, np.floating, np.integer)) and mpp > 0):
        raise ConfigError(f"mpp={mpp!r}: use microns per pixel > 0 (40x is about 0.25), or None")
    if isinstance(path_or_array, np.ndarray):
        return _open_array(path_or_array, mpp)
    if not isinstance(path_or_array, (str, bytes, os.PathLike)):
        raise ConfigError(f"open_slide takes a path or an H x W x 3 uint8 NumPy array, got "
                          f"{type(path_or_array).__name__}")
    path = os.fsdecode(os.fspath(path_or_array))
    if not os.path.exists(path):
        raise SlideError(f"{path}: no such file; check the path (relative paths start at {os.getcwd()})")
    if os.path.isdir(path):
        raise SlideError(f"{path}: is a directory; give the slide file inside it (for MIRAX, the .mrxs "
                         "file next to the directory)")
    try:
        with open(path, "rb") as fh:
            head = fh.read(16)
    except OSError as exc:
        raise SlideError(f"{path}: cannot be read ({exc.strerror}); check its permissions") from None
    if not head:
        raise SlideError(f"{path}: the file is empty; copy it again from the scanner")

    import openslide.lowlevel as ll

    try:
        vendor = ll.detect_vendor(path)
    except Exception:
        vendor = None
    if vendor is not None:
        slide = OpenSlideSlide(path, vendor, mpp=mpp, handles=handles)
        if head[:4] in _TIFF_MAGIC:
            try:
                _check_tiff_extents(path)
            except SlideError:
                slide.close()
                raise
        if reader == "openslide":
            return slide
        from .direct import DirectTiffSlide, servable

        levels, why = servable(path, vendor, slide.level_dimensions) if head[:4] in _TIFF_MAGIC else \
            (None, f"{vendor} is not a TIFF file")
        if levels is None:
            slide.reader_note = why
            if reader == "direct":
                slide.close()
                raise SlideError(f"{path}: the direct reader cannot serve this slide ({why}); open it with "
                                 "reader='auto' or 'openslide'")
            return slide
        try:
            return DirectTiffSlide(slide, levels)
        finally:
            slide.close()
    if reader == "direct":
        raise SlideError(f"{path}: the direct reader serves tiled SVS and generic TIFF slides only; open this "
                         "one with reader='auto'")
    if head[:4] in _TIFF_MAGIC:
        return _open_tiff(path, mpp)
    if (Path(path).suffix.lower() in _PIL_SUFFIXES or head[:8] == b"\x89PNG\r\n\x1a\n"
            or head[:3] == b"\xff\xd8\xff"):
        return _open_pil(path, mpp)
    raise SlideError(f"{path}: not a format fastgicn reads (OpenSlide does not recognise it and it is not a "
                     "TIFF, PNG or JPEG image); convert it to a pyramidal tiled TIFF or SVS")


def _open_array(arr: np.ndarray, mpp: float | None) -> ImageSlide:
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise SlideError(f"array slide must be H x W x 3 uint8 RGB, got {arr.dtype} {arr.shape}; convert "
                         "with e.g. np.clip(a, 0, 255).astype(np.uint8)[..., :3]")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise SlideError(f"array slide is empty ({arr.shape})")
    return ImageSlide(arr, name=f"array {arr.shape[1]}x{arr.shape[0]}", mpp=mpp)


def _to_rgb(arr: np.ndarray, path: str, what: str) -> np.ndarray:
    """uint8 gray, gray+alpha, RGB or RGBA -> RGB (alpha composited on white)."""
    if arr.dtype != np.uint8:
        raise SlideError(f"{path}: {what} has {arr.dtype} samples; fastgicn reads 8-bit RGB. Convert it "
                         "(e.g. vips cast / tifffile) to 8 bits per channel")
    if arr.ndim == 2:
        return np.repeat(arr[:, :, None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (1, 2, 3, 4):
        raise SlideError(f"{path}: {what} has shape {arr.shape}; expected H x W with 1, 3 or 4 samples")
    c = arr.shape[2]
    if c == 3:
        return arr
    if c == 1:
        return np.repeat(arr, 3, axis=2)
    rgba = arr if c == 4 else np.concatenate([np.repeat(arr[..., :1], 3, axis=2), arr[..., 1:]], axis=2)
    rgb = np.empty(arr.shape[:2] + (3,), np.uint8)
    _tiler.rgba_to_rgb(rgba, rgb)
    return rgb


_tifffile_log = logging.getLogger("tifffile")


class _TiffWarnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _tiff_problems():
    """Context manager collecting tifffile's warnings (it logs, not raises, on broken IFD chains)."""
    class _Ctx:
        def __enter__(self):
            self.handler = _TiffWarnings()
            _tifffile_log.addHandler(self.handler)
            self.propagate = _tifffile_log.propagate
            _tifffile_log.propagate = False
            return self.handler

        def __exit__(self, *exc):
            _tifffile_log.removeHandler(self.handler)
            _tifffile_log.propagate = self.propagate
    return _Ctx()


def _page_extents(tf) -> Iterator[tuple[int, int, int]]:
    for i, page in enumerate(tf.pages):
        offsets = np.asarray(page.dataoffsets, dtype=np.int64)
        counts = np.asarray(page.databytecounts, dtype=np.int64)
        if offsets.size:
            yield i, int((offsets + counts).max()), int((counts == 0).sum())


def _check_tiff_extents(path: str) -> None:
    """Raise SlideError if a TIFF's IFD chain or image data run past the end of the file (truncated).

    Only tifffile's parse is used (no pixel is decoded). If tifffile cannot parse a file OpenSlide
    opened, OpenSlide is trusted and the check is skipped."""
    import tifffile

    size = os.path.getsize(path)
    try:
        with _tiff_problems() as problems, tifffile.TiffFile(path) as tf:
            extents = list(_page_extents(tf))
    except Exception:
        return
    for msg in problems.messages:
        if "invalid page offset" in msg or "corrupted" in msg.lower():
            raise SlideError(f"{path}: the TIFF's directory chain is broken ({msg.strip()}); the file is "
                             "truncated or corrupt: copy it again from the scanner")
    for i, end, _ in extents:
        if end > size:
            raise SlideError(f"{path}: truncated: image data of TIFF page {i} ends at byte {end} but the "
                             f"file has {size} bytes; copy it again from the scanner")


def _open_tiff(path: str, mpp: float | None) -> ImageSlide:
    import tifffile

    size = os.path.getsize(path)
    try:
        with _tiff_problems() as problems, tifffile.TiffFile(path) as tf:
            if not tf.pages:
                raise SlideError(f"{path}: the TIFF has no image; the file is corrupt")
            page = tf.pages[0]
            for i, end, _ in _page_extents(tf):
                if i == 0 and end > size:
                    raise SlideError(f"{path}: truncated: image data ends at byte {end} but the file has "
                                     f"{size} bytes; copy it again")
            broken = [m for m in problems.messages if "invalid page offset" in m]
            shape, dtype = page.shape, page.dtype
            file_mpp = _tiff_mpp(page)
            desc = page.description or ""
            n_pixels = int(shape[0]) * int(shape[1]) if len(shape) >= 2 else 0
            mapped = None
            if page.is_memmappable and dtype == np.uint8 and len(shape) == 3 and shape[2] == 3:
                mapped = tifffile.memmap(path, page=0, mode="r")
            elif n_pixels > MAX_PLAIN_IMAGE_PIXELS:
                raise SlideError(f"{path}: a {shape[1]} x {shape[0]} single-level compressed TIFF is too "
                                 "large to load; convert it to a pyramidal tiled TIFF (e.g. vips tiffsave "
                                 "--tile --pyramid) so OpenSlide can read it in tiles")
            if mapped is None and page.compression != 1:
                try:
                    tifffile.TIFF.DECOMPRESSORS[page.compression]
                except (KeyError, ValueError, ImportError, AttributeError):
                    raise _compression_error(path, f"Unsupported TIFF compression: {int(page.compression)}",
                                             "tifffile/imagecodecs") from None
            pixels = mapped if mapped is not None else page.asarray()
    except SlideError:
        raise
    except MemoryError:
        raise SlideError(f"{path}: not enough memory to load this single-level TIFF; convert it to a "
                         "pyramidal tiled TIFF") from None
    except Exception as exc:
        raise SlideError(f"{path}: tifffile cannot read this TIFF ({type(exc).__name__}: {exc}); the file "
                         "is corrupt, truncated or in an unsupported layout") from None
    if broken:
        raise SlideError(f"{path}: the TIFF's directory chain is broken ({broken[0].strip()}); the file "
                         "is truncated or corrupt: copy it again")
    rgb = _to_rgb(pixels, path, "the TIFF")
    props = {"tiff.ImageDescription": desc} if desc else {}
    return ImageSlide(rgb, name=os.path.basename(path), path=path, vendor="tiff",
                      mpp=_mpp_override(mpp) or file_mpp, properties=props)


def _open_pil(path: str, mpp: float | None) -> ImageSlide:
    from PIL import Image

    try:
        with Image.open(path) as im:
            w, h = im.size
            if w * h > MAX_PLAIN_IMAGE_PIXELS:
                raise SlideError(f"{path}: a {w} x {h} plain image is too large to load; convert it to a "
                                 "pyramidal tiled TIFF (e.g. vips tiffsave --tile --pyramid)")
            saved = Image.MAX_IMAGE_PIXELS
            Image.MAX_IMAGE_PIXELS = None   # our own limit above replaces PIL's bomb guard
            try:
                im.load()
            finally:
                Image.MAX_IMAGE_PIXELS = saved
            fmt = im.format or "image"
            if im.mode in ("RGB", "RGBA", "L", "LA"):
                arr = np.asarray(im)
            elif "A" in im.getbands() or im.mode == "P" and "transparency" in im.info:
                arr = np.asarray(im.convert("RGBA"))
            else:
                arr = np.asarray(im.convert("RGB"))
    except SlideError:
        raise
    except Exception as exc:
        raise SlideError(f"{path}: cannot decode this image ({type(exc).__name__}: {exc}); the file is "
                         "corrupt, truncated or not an image") from None
    rgb = _to_rgb(np.ascontiguousarray(arr), path, f"the {fmt}")
    return ImageSlide(rgb, name=os.path.basename(path), path=path, vendor=fmt.lower(),
                      mpp=_mpp_override(mpp))


# ---------------------------------------------------------------------------------------------------
# Helpers


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


def _mpp_override(mpp: float | None) -> tuple[float, float] | None:
    return None if mpp is None else (float(mpp), float(mpp))


# Microns per pixel a microscope slide can have. A 72-dpi placeholder is 353 um/px, 300 dpi 85 um/px; a 1.25x
# scan is about 8 um/px.
PLAUSIBLE_MPP = (0.01, 50.0)


def plausible_mpp(x: float, y: float) -> bool:
    lo, hi = PLAUSIBLE_MPP
    return all(math.isfinite(v) and lo <= v <= hi for v in (x, y))


def _props_mpp(props: dict[str, str], path: str = "") -> tuple[tuple[float, float] | None, str | None]:
    """(mpp_xy or None, a note when the file's value was not plausible)."""
    try:
        x, y = float(props["openslide.mpp-x"]), float(props["openslide.mpp-y"])
    except (KeyError, ValueError):
        return None, None
    if plausible_mpp(x, y):
        return (x, y), None
    return None, (f"{path}: the file records {x:.4g} x {y:.4g} um/px, not a microscope's resolution (a "
                  "dpi placeholder?), so the MPP is taken as missing: give it with --mpp, or read a level "
                  "with --level")


def _tiff_mpp(page) -> tuple[float, float] | None:
    """Microns per pixel from the TIFF resolution tags, when their unit is centimetre or inch and the
    value is plausible for microscopy (0.01..100 um/px; 72 dpi placeholders are ignored)."""
    tags = page.tags
    unit = tags.get("ResolutionUnit")
    xr, yr = tags.get("XResolution"), tags.get("YResolution")
    if unit is None or xr is None or yr is None:
        return None
    per = {2: 25400.0, 3: 10000.0}.get(int(unit.value))
    if per is None:
        return None

    def um(v) -> float | None:
        num, den = v if isinstance(v, tuple) else (v, 1)
        return per * den / num if num else None

    x, y = um(xr.value), um(yr.value)
    if x is None or y is None or not plausible_mpp(x, y):
        return None
    return (x, y)


def _check_int(v, name: str) -> int:
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
        raise ConfigError(f"{name}={v!r}: use an integer number of pixels")
    return int(v)


def _check_size(w, h) -> tuple[int, int]:
    w, h = _check_int(w, "w"), _check_int(h, "h")
    if w < 0 or h < 0:
        raise ConfigError(f"region size {w} x {h}: width and height must be >= 0")
    return w, h
