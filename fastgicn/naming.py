"""Names: what fastgicn calls the files it writes, and how it recognises a slide.

- `output_paths(out_dir, stem)`: the per-slide outputs (report last, as the mark of completion);
- `slide_stem(slide)`: outputs are named after the slide file without its extension;
- `mask_path_for(slide)`: the ground-truth mask beside a slide, `NAME.mask.tif`;
- `slide_identity(path)`: what makes two files the same slide (size and a hash of the first and last 256 KiB,
  where TIFF headers and directories live), not where they are or when they were copied;
- `tiff_ascii(text)`: TIFF text tags must be 7-bit ASCII: accents are transliterated (Müller -> Muller),
  anything else becomes a \\u escape, so a file name in any script still reads back unambiguously.
"""
from __future__ import annotations

import hashlib
import os
import unicodedata
from pathlib import Path

__all__ = ["OUTPUT_SUFFIXES", "output_paths", "slide_stem", "mask_path_for", "slide_identity", "tiff_ascii",
           "FAILURES_NAME"]

OUTPUT_SUFFIXES = {
    "probability": ".tumour_probability.tif",
    "mask": ".tumour_mask.tif",
    "geojson": ".tumour.geojson",
    "overlay": ".overlay.png",
    "report": ".report.json",
}
# The manifest of a run's failed slides, beside the outputs (one line per slide: path, reason, time).
FAILURES_NAME = "fastgicn_failures.tsv"
_IDENTITY_SPAN = 256 * 1024


def output_paths(out_dir, stem: str) -> dict[str, Path]:
    """Where the outputs of a slide named `stem` go (the report last, as the mark of completion)."""
    out_dir = Path(out_dir)
    return {k: out_dir / f"{stem}{suffix}" for k, suffix in OUTPUT_SUFFIXES.items()}


def slide_stem(slide) -> str:
    """Output names come from the slide file's name without its extension ("array" for pixels, the
    slide's `name` for an open slide)."""
    import numpy as np

    if isinstance(slide, np.ndarray):
        return "array"
    if not isinstance(slide, (str, bytes, os.PathLike)):
        return Path(str(getattr(slide, "name", "slide"))).name.rsplit(".", 1)[0].replace(" ", "_")
    return Path(os.fsdecode(slide)).name.rsplit(".", 1)[0]


def mask_path_for(slide_path) -> Path:
    """The ground-truth mask of a slide: OUT.svs -> OUT.mask.tif beside it."""
    slide_path = Path(slide_path)
    return slide_path.with_name(slide_path.stem + ".mask.tif")


def slide_identity(path) -> dict | None:
    """{"path", "bytes", "content"} of a slide file: `content` is the sha256 of its size and its first and last
    256 KiB, so a copy elsewhere is the same slide and another slide under the same name is not. None for
    arrays and open slides."""
    if not isinstance(path, (str, bytes, os.PathLike)):
        return None
    path = Path(os.fsdecode(path))
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as fh:
        h.update(fh.read(_IDENTITY_SPAN))
        if size > 2 * _IDENTITY_SPAN:
            fh.seek(size - _IDENTITY_SPAN)
        h.update(fh.read(_IDENTITY_SPAN))
    return {"path": str(path.resolve()), "bytes": size, "content": h.hexdigest()[:32]}


def tiff_ascii(text: str | None) -> str | None:
    """`text` as 7-bit ASCII for a TIFF tag: accents dropped (NFKD), other characters as \\uXXXX escapes."""
    if text is None or text.isascii():
        return text
    out = []
    for ch in unicodedata.normalize("NFKD", text):
        if ch.isascii():
            out.append(ch)
        elif unicodedata.combining(ch):
            continue
        else:
            out.append(ch.encode("ascii", "backslashreplace").decode("ascii"))
    return "".join(out)
