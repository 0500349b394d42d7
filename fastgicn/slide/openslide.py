"""Slides read by libopenslide: every format OpenSlide reads (Aperio SVS, generic tiled TIFF, NDPI, MRXS, ...).

Regions are read straight into a NumPy uint32 buffer through libopenslide's `openslide_read_region`
(ctypes releases the GIL for the call) and converted by the Cython tiler in one pass: premultiplied
ARGB to RGB composited on white, written where the caller wants it (a batch slot, say).

Errors: a file OpenSlide cannot open, metadata it cannot read, a read that fails: `SlideError` naming the
file, the reason and what to do (an unsupported compression says how to convert the slide).

Threads: OpenSlide is thread-safe on one handle; by default threads share it (`handles="shared"`), and
`handles="per_thread"` gives each thread its own handle (its own tile cache and TIFF state, no
contention on the handle's locks) at the cost of one open per thread; use it with a pool of long-lived
threads, since a handle stays open until `close()` even after its thread ends.
"""
from __future__ import annotations

import ctypes
import math
import os
import threading

import numpy as np

from .. import _tiler
from ..errors import ConfigError, SlideError
from .base import _SCRATCH_KEEP, Slide, _compression_error, _mpp_override, plausible_mpp

__all__ = ["OpenSlideSlide"]


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
