"""The Aperio SVS pages beside the tiled levels: ImageDescriptions in the form OpenSlide's Aperio reader
parses, the stripped thumbnail, label and macro pages (their checks and codecs)."""
from __future__ import annotations

import numpy as np

from ..errors import ConfigError
from .reduce import _halvings

# The first line of every Aperio ImageDescription (the version OpenSlide's test slides and ours carry).
APERIO_LIBRARY = "Aperio Image Library v12.0.15"
THUMBNAIL_SIZE = 1024  # the long side an Aperio thumbnail page has at most
_STRIP_ROWS = 16  # rows per strip of the stripped pages (a multiple of the 2x2-subsampled JPEG MCU)
# NewSubfileType of the stripped pages (tifffile names an SVS page "Macro" by 9, else "Label")
_SUBFILETYPE_LABEL, _SUBFILETYPE_MACRO = 1, 9


def aperio_description(width: int, height: int, tile: int, compression: str, quality: int,
                       mpp: float | None, app_mag: float | None, level_size: tuple[int, int] | None = None,
                       extra: str = "") -> str:
    """ImageDescription in the form OpenSlide's Aperio reader parses (`key = value` fields after `|`)."""
    codec = f"JPEG/RGB Q={quality}" if compression == "jpeg" else compression.upper()
    head = f"{APERIO_LIBRARY}\r\n{width}x{height} [0,0 {width}x{height}] ({tile}x{tile})"
    if level_size is not None:
        head += f" -> {level_size[0]}x{level_size[1]}"
    return "|".join([f"{head} {codec}"] + _aperio_fields(mpp, app_mag, extra))


def aperio_thumbnail_description(width: int, height: int, size: tuple[int, int], mpp: float | None,
                                 app_mag: float | None, extra: str = "") -> str:
    """ImageDescription of an Aperio thumbnail page: ``WxH -> wxh - `` and the slide's fields."""
    head = f"{APERIO_LIBRARY}\r\n{width}x{height} -> {size[0]}x{size[1]} - "
    return "|".join([head] + _aperio_fields(mpp, app_mag, extra))


def aperio_associated_description(name: str, size: tuple[int, int]) -> str:
    """ImageDescription of an Aperio label or macro page; OpenSlide names the image by the word after the
    line break."""
    return f"{APERIO_LIBRARY}\r\n{name} {size[0]}x{size[1]}"


def _aperio_fields(mpp: float | None, app_mag: float | None, extra: str) -> list[str]:
    fields = []
    if app_mag is not None:
        fields.append(f"AppMag = {app_mag:g}")
    if mpp is not None:
        fields.append(f"MPP = {mpp:.6g}")
    if extra:
        fields.append(extra)
    return fields


def _validate_aperio_pages(aperio, level_step, thumbnail, label, macro) -> int | None:
    """Checks the Aperio layout keywords; returns the thumbnail's largest long side (None: no thumbnail)."""
    _halvings(level_step)
    if isinstance(thumbnail, bool):
        thumb_size = THUMBNAIL_SIZE if thumbnail else None
    elif isinstance(thumbnail, (int, np.integer)) and thumbnail >= 16:
        thumb_size = int(thumbnail)
    else:
        raise ConfigError(f"thumbnail={thumbnail!r}: use True (long side at most {THUMBNAIL_SIZE} px), "
                          "False, or the largest long side in pixels (at least 16)")
    for name, value in (("thumbnail", thumb_size), ("label", label), ("macro", macro)):
        if value is not None and not aperio:
            raise ConfigError(f"{name}: thumbnail, label and macro pages belong to the Aperio SVS layout; "
                              "pass aperio=True (or leave them out of a generic TIFF)")
    for name, value in (("label", label), ("macro", macro)):
        if value is not None and not callable(value):
            _check_associated(name, value)
    return thumb_size


def _check_associated(name: str, image) -> np.ndarray:
    """A label or macro image: uint8, H x W or H x W x 3, at most 65535 px a side."""
    image = np.asarray(image)
    if (image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] != 3)
            or min(image.shape[:2]) < 1 or max(image.shape[:2]) > 65535):
        raise ConfigError(f"{name} image {image.dtype} {image.shape}: give uint8 pixels, H x W x 3 (RGB) or "
                          "H x W, at most 65535 px a side (or a function of the low-resolution slide image "
                          "that returns them)")
    return np.ascontiguousarray(image)


def _stripped_codec(compression: str, quality: int, image: np.ndarray) -> dict:
    """tifffile arguments that compress a stripped page (JPEG RGB as YCbCr 2x2, like the tiles)."""
    if compression == "jpeg":
        codec = dict(compression="jpeg", compressionargs={"level": quality})
        if image.ndim == 3:
            codec["subsampling"] = (2, 2)
        return codec
    return dict(compression=compression)
