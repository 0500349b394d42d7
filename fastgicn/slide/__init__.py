"""Slide reading, tissue mask, tile grid, batch queue, stitching and output writers (pyramidal TIFF)."""
from ..config import TileConfig
from .grid import (grid_shape, keep_tile, read_level_for, tile_background, tile_grid, tiles_touching_mask,
                   tissue_tiles)
from .reader import ImageSlide, OpenSlideSlide, Slide, open_slide
from .tissue import TissueMask, mask_from_rgb, otsu_threshold, tissue_mask

__all__ = ["TileConfig", "Slide", "OpenSlideSlide", "ImageSlide", "open_slide", "TissueMask", "tissue_mask",
           "mask_from_rgb", "otsu_threshold", "tile_grid", "grid_shape", "read_level_for", "keep_tile",
           "tiles_touching_mask", "tile_background", "tissue_tiles"]
