"""From a slide to network inputs and back: the tile grid, reader threads filling a ring of batches, and the
one stitcher (used by `segment_slide` and by `TileStream`)."""
from .grid import (grid_shape, keep_tile, read_level_for, read_resolution_for, real_pixels, tile_background,
                   tile_grid, tiles_touching_mask, tissue_tiles)
from .stitch import Stitcher, stitch_to_array

__all__ = ["grid_shape", "keep_tile", "read_level_for", "read_resolution_for", "real_pixels", "tile_background",
           "tile_grid", "tiles_touching_mask", "tissue_tiles", "Stitcher", "stitch_to_array", "BatchRing", "Batch",
           "iterate_batches"]


def __getattr__(name):
    if name in ("BatchRing", "Batch", "iterate_batches"):   # imports torch (pinned memory): on first use
        from . import batches

        return getattr(batches, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
