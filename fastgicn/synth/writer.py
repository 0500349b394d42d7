"""write_synthetic_slide: a synthetic slide and its ground-truth mask, streamed to pyramidal TIFFs."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import ConfigError, SlideError
from ..naming import mask_path_for
from .pages import synthetic_label, synthetic_macro
from .slide import SyntheticSlide

SLIDE_SUFFIXES = {".svs": "aperio", ".tif": "tiff", ".tiff": "tiff"}
SLIDE_FORMATS = ("aperio", "tiff")
# "aperio": as an Aperio 40x scanner lays out an SVS (level 0, a stripped thumbnail, tiled levels at
# downsample 4, 16, 64, ..., a label and a macro image); "pow2": a tiled level at every power of two.
SLIDE_LAYOUTS = ("aperio", "pow2")

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
        from . import DEFAULT_SVS_LAYOUT  # noqa: PLC0415 (the package's setting, read at each call)

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
    from ..outputs.tiff import write_pyramid  # noqa: PLC0415 (keeps `import fastgicn.synth` light)

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
