"""Opening a slide: `open_slide(path_or_array, mpp=None)` returns a `Slide`.

- `DirectTiffSlide` (fastgicn.slide.direct) for tiled Aperio SVS and generic TIFF slides it can serve;
- `OpenSlideSlide` (fastgicn.slide.openslide) for every other format OpenSlide reads;
- `ImageSlide` (fastgicn.slide.image) for plain TIFF, PNG and JPEG, and for H x W x 3 uint8 arrays.

The format is told from the file's first bytes and OpenSlide's vendor detection; a TIFF OpenSlide opens is
first checked for a directory chain or image data running past the end of the file (a truncated copy).

Errors: a missing file, a directory, an unsupported or corrupt file, a truncated slide: `SlideError` naming
the file, the reason and what to do. Bad arguments: `ConfigError`.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import ConfigError, SlideError
from .base import Slide
from .image import _open_array, _open_pil, _open_tiff, _page_extents, _tiff_problems
from .openslide import OpenSlideSlide

__all__ = ["open_slide"]

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_PIL_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}


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


def _check_tiff_extents(path: str) -> None:
    """Raise SlideError if a TIFF's IFD chain or image data run past the end of the file (truncated).

    Only tifffile's parse is used (no pixel is decoded). If tifffile cannot parse a file OpenSlide
    opened, OpenSlide is trusted and the check is skipped."""
    import tifffile

    size = os.path.getsize(path)
    try:
        with _tiff_problems() as problems, tifffile.TiffFile(path) as tf:
            extents = list(_page_extents(tf))
            grids = [g for g in map(_tile_grid_problem, tf.pages) if g]
    except Exception:
        return
    if grids:  # before OpenSlide reads a tile: a 1-TB tile size aborts the process in GLib's allocator
        raise SlideError(f"{path}: the TIFF is corrupt ({grids[0]}): copy it again from the scanner")
    for msg in problems.messages:
        if "invalid page offset" in msg or "corrupted" in msg.lower():
            raise SlideError(f"{path}: the TIFF's directory chain is broken ({msg.strip()}); the file is "
                             "truncated or corrupt: copy it again from the scanner")
    for i, end, _ in extents:
        if end > size:
            raise SlideError(f"{path}: truncated: image data of TIFF page {i} ends at byte {end} but the "
                             f"file has {size} bytes; copy it again from the scanner")


MAX_TILE_SIDE = 1 << 14  # tiles are 240-1024 pixels; a bigger tile side is a damaged tag


def _tile_grid_problem(page) -> str | None:
    """What is wrong with a tiled page's tile geometry (a side beyond `MAX_TILE_SIDE`, or not as many tile
    offsets and byte counts as its tile grid has: a damaged width, length or tile size), or None."""
    if not page.is_tiled or int(getattr(page, "imagedepth", 1) or 1) != 1:
        return None
    tw, th, w, h = (int(v) for v in (page.tilewidth, page.tilelength, page.imagewidth, page.imagelength))
    if not (0 < tw <= MAX_TILE_SIDE and 0 < th <= MAX_TILE_SIDE):
        return f"page {page.index} has {tw} x {th} pixel tiles"
    planes = int(page.samplesperpixel) if int(page.planarconfig) == 2 else 1
    expected = -(-w // tw) * -(-h // th) * planes
    if len(page.dataoffsets) != expected or len(page.databytecounts) != expected:
        return (f"page {page.index} is {w} x {h} pixels in {tw} x {th} tiles, {expected} tiles, but lists "
                f"{len(page.dataoffsets)} tile offsets and {len(page.databytecounts)} byte counts")
    return None
