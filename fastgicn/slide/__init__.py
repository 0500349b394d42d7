"""Reading slides: the `Slide` interface, the direct tiled-TIFF reader, OpenSlide, plain images and arrays,
the resolution to read at, and the tissue mask. No torch here: importing the reader stays light."""
from .base import Slide
from .image import ImageSlide
from .open import open_slide
from .openslide import OpenSlideSlide
from .resolution import Resolution, resolution_for
from .tissue import TissueMask, mask_from_rgb, otsu_threshold, tissue_mask

__all__ = ["Resolution", "resolution_for", "Slide", "OpenSlideSlide", "ImageSlide", "open_slide", "TissueMask",
           "tissue_mask", "mask_from_rgb", "otsu_threshold"]
