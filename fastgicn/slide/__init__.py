"""Slide reading, tissue mask, tile grid, batch queue, stitching and output writers (pyramidal TIFF)."""
from ..config import TileConfig
from .grid import (grid_shape, keep_tile, read_level_for, read_resolution_for, tile_background, tile_grid, tiles_touching_mask,
                   tissue_tiles)
from .reader import ImageSlide, OpenSlideSlide, Slide, open_slide
from .resolution import Resolution, resolution_for
from .tissue import TissueMask, mask_from_rgb, otsu_threshold, tissue_mask

__all__ = ["TileConfig", "Resolution", "resolution_for", "Slide", "OpenSlideSlide", "ImageSlide", "open_slide", "TissueMask", "tissue_mask",
           "mask_from_rgb", "otsu_threshold", "tile_grid", "grid_shape", "read_level_for", "read_resolution_for", "keep_tile",
           "tiles_touching_mask", "tile_background", "tissue_tiles"]

# The batch ring, stitcher, writers and pipeline import torch: loaded on first use, so importing the reader
# (or fastgicn.synth, which uses the TIFF writer) stays light.
_LAZY = {
    "BatchRing": "batches", "Batch": "batches", "iterate_batches": "batches",
    "Stitcher": "stitch", "stitch_to_array": "stitch",
    "PyramidBandWriter": "outputs", "LowRes": "outputs", "write_overlay_png": "outputs",
    "mask_to_polygons": "polygons", "geojson_features": "polygons", "write_geojson": "polygons",
    "segment_slide": "pipeline", "segment_slides": "pipeline", "SlideResult": "pipeline",
    "output_paths": "pipeline", "outputs_complete": "pipeline", "demo_slide": "pipeline",
    "load_model": "pipeline",
}
__all__ += list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
