"""Single-level images: plain TIFF (tifffile; memory-mapped when uncompressed), PNG and JPEG (PIL), and
H x W x 3 uint8 arrays a scanner pipeline hands over, all held as one RGB array (`ImageSlide`).
"""
from __future__ import annotations

import logging
import os
from typing import Iterator

import numpy as np

from .. import _tiler
from ..errors import SlideError
from .base import Slide, _compression_error, _mpp_override, plausible_mpp

__all__ = ["ImageSlide", "MAX_PLAIN_IMAGE_PIXELS"]

# Plain (single-level) images are loaded into memory unless memory-mappable; refuse beyond this many
# pixels (3 GiB of RGB) and point to a pyramidal TIFF instead.
MAX_PLAIN_IMAGE_PIXELS = 1 << 30


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
