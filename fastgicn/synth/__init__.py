"""Synthetic H&E-like slides with an exact ground-truth tumour mask, streamed to pyramidal TIFF.

A `SyntheticSlide` is a pure function of (level-0 pixel position, seed): white glass with scanner noise and
faint scanner stripes; a few irregular tissue islands of pink eosin stroma with wavy collagen fibres and
sparse normal nuclei (round lymphocyte-like and elongated fibroblast-like, purple hematoxylin); and tumour
regions inside the tissue, both small (XS: every connected component under 50,000 level-0 pixels, the
paper's Table 4 split) and large (XL), whose texture differs: nuclei about four times as dense, larger,
darker, irregular in shape, with clumped chromatin and a pale centre, on a lilac cytoplasm instead of stroma.

Every pixel is computed from its absolute coordinates, so rendering any region, with any tiling or offset,
gives exactly the pixels of a larger render cropped (no seams when tiles are stitched). Three rules keep that
bit-exact: the region fields are value noise interpolated in integer arithmetic (exact in floating point, in
any order), the per-pixel float work is elementwise +, -, *, / only (correctly rounded, so independent of
array shapes and SIMD paths; sines and cosines are looked up, never recomputed), and nuclei are stamps
combined with `max` (order-free). Colours come from a Beer-Lambert table indexed by eosin and hematoxylin
amounts. The mask is the tumour region's defining function evaluated per pixel: 255 where the pixel is in
tissue and in a tumour blob, else 0. Speed: a bounded sampling test (`_Field.classify`) skips the per-pixel
field work on rectangles that are surely all inside or all outside a region, and glass is a table lookup.
The drawing is at a fixed pixel scale (nuclei 5-25 px across); `mpp` only labels the slide. Determinism is
bit-exact for a seed on one platform; the seed's textures are made once with NumPy's sin/exp and rounded to
uint8, so another libm could in rare texels differ by one level.
"""
from __future__ import annotations

from ..naming import mask_path_for  # the one rule, re-exported for callers
from .pages import LABEL_SIZE, synthetic_label, synthetic_macro
from .slide import XS_AREA_LIMIT, SyntheticSlide
from .writer import MIN_SIDE, SLIDE_FORMATS, SLIDE_LAYOUTS, SLIDE_SUFFIXES, write_synthetic_slide

# Read by write_synthetic_slide at each call, here: the one place to change the default.
DEFAULT_SVS_LAYOUT = "aperio"  # the layout of a .svs when none is asked for (.tif is always "pow2")

__all__ = ["SyntheticSlide", "write_synthetic_slide", "synthetic_label", "synthetic_macro", "mask_path_for",
           "XS_AREA_LIMIT", "LABEL_SIZE", "MIN_SIDE", "SLIDE_SUFFIXES", "SLIDE_FORMATS", "SLIDE_LAYOUTS",
           "DEFAULT_SVS_LAYOUT"]
