"""Annotations in, masks out: ASAP XML / QuPath GeoJSON polygons (`read`), exact pixel-centre rasterising in
bands into a pyramidal mask TIFF (`rasterise`). See `read` for the coordinate convention and group rules."""
from .rasterise import MaskRenderer, MaskWritten, PolygonRaster, mask_from_annotations, write_mask
from .read import (
    ANNOTATION_SUFFIXES,
    DEFAULT_EXCLUSION_GROUPS,
    DEFAULT_TUMOUR_GROUPS,
    AnnotationError,
    Annotations,
    Region,
    annotation_stem,
    read_annotations,
)

__all__ = ["AnnotationError", "Annotations", "Region", "read_annotations", "annotation_stem", "PolygonRaster",
           "MaskRenderer", "MaskWritten", "write_mask", "mask_from_annotations", "ANNOTATION_SUFFIXES",
           "DEFAULT_TUMOUR_GROUPS", "DEFAULT_EXCLUSION_GROUPS"]
