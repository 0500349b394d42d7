"""Tumour annotations in: ASAP XML (Camelyon16) and QuPath GeoJSON, as polygons in level-0 pixels.

Coordinates are continuous level-0 positions with (0, 0) the top-left corner of the top-left pixel: pixel
(col, row) covers [col, col + 1) x [row, row + 1), as OpenSlide addresses level 0, as QuPath draws its ROIs
and as `fastgicn.outputs.polygons` traces masks (along pixel edges). `fastgicn.annotations.rasterise` marks
a pixel tumour when its centre (col + 0.5, row + 0.5) lies inside.

Which polygons are tumour:

- ASAP XML: an annotation's ``PartOfGroup`` (or the group its group belongs to) decides. Camelyon16's rule is
  the default: groups "Tumor", "_0" and "_1" are tumour; "Exclusion" and "_2" are cut out of them. Any other
  group is an error naming it (pass `tumour_groups` / `exclusion_groups` to place it). Types Polygon,
  Rectangle and Spline are read as polygons through their points; Dot and PointSet carry no area and are
  skipped with a warning.
- GeoJSON (QuPath): a FeatureCollection, a Feature, a bare list of Features, or a bare Polygon/MultiPolygon.
  Polygon and MultiPolygon geometries (with holes; GeometryCollections are opened) of annotation objects
  (``properties.objectType`` or the older ``object_type``; objects without a type count as annotations;
  detections and cells are skipped with a warning). The class is ``properties.classification.name`` (QuPath
  0.2+), or ``properties.classification`` as a string (older exports). `classes` picks the tumour classes and
  `exclude_classes` those cut out; with no `classes`, every polygon is tumour when the file holds at most
  one class, and a file with several classes is an error listing them.

Files come from elsewhere: XML is parsed by defusedxml (no DTD, no entities, no external references) and no
file larger than `max_mb` (default 256 MB, or $FASTGICN_MAX_ANNOTATION_MB) is read. Every error is an
`AnnotationError` naming the file, the annotation and the fix.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import AnnotationError

__all__ = ["AnnotationError", "Region", "Annotations", "read_annotations", "annotation_stem",
           "ANNOTATION_SUFFIXES", "DEFAULT_TUMOUR_GROUPS", "DEFAULT_EXCLUSION_GROUPS", "DEFAULT_MAX_MB",
           "MAX_MB_ENV"]

DEFAULT_TUMOUR_GROUPS = ("Tumor", "_0", "_1")
DEFAULT_EXCLUSION_GROUPS = ("Exclusion", "_2")
ANNOTATION_SUFFIXES = (".xml", ".geojson", ".json")
DEFAULT_MAX_MB = 256.0
MAX_MB_ENV = "FASTGICN_MAX_ANNOTATION_MB"
_AREA_TYPES_ASAP = ("polygon", "rectangle", "spline")
_POINT_TYPES_ASAP = ("dot", "pointset", "point")
_ANNOTATION_OBJECTS = ("annotation", "pathannotationobject")
_MAX_COORDINATE = 2.0 ** 40  # TIFF allows 2^32 pixels a side; far beyond it is a broken file


@dataclass(frozen=True, eq=False)
class Region:
    """One polygon: `rings[0]` its outline, the rest its holes, each an (n, 2) float64 array of x, y in
    level-0 pixels, not closed (the last point is not the first repeated). `label`: its ASAP group or QuPath
    class."""

    name: str
    label: str | None
    rings: tuple

    def bounds(self) -> tuple[float, float, float, float]:
        xy = self.rings[0]
        return float(xy[:, 0].min()), float(xy[:, 1].min()), float(xy[:, 0].max()), float(xy[:, 1].max())


@dataclass
class Annotations:
    """The tumour polygons of one file and those cut out of them, with what was skipped (`warnings`)."""

    path: Path
    tumour: list
    exclusion: list = field(default_factory=list)
    warnings: list = field(default_factory=list)

    def clip_warnings(self, width: int, height: int) -> list[str]:
        """One warning per polygon that leaves the `width` x `height` slide (those parts are left out, as
        clipped); raises AnnotationError when no tumour polygon touches the slide at all (another slide's
        annotations?)."""
        out, inside = [], 0
        for region, is_tumour in [(r, True) for r in self.tumour] + [(r, False) for r in self.exclusion]:
            x0, y0, x1, y1 = region.bounds()
            if x1 <= 0 or y1 <= 0 or x0 >= width or y0 >= height:
                out.append(f"{self.path}: annotation {region.name!r} lies wholly outside the "
                           f"{width}x{height} slide (x {x0:g}..{x1:g}, y {y0:g}..{y1:g}); it is left out")
                continue
            inside += is_tumour
            if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
                out.append(f"{self.path}: annotation {region.name!r} passes the edge of the {width}x{height} "
                           f"slide (x {x0:g}..{x1:g}, y {y0:g}..{y1:g}); clipped to the slide")
        if self.tumour and not inside:
            raise AnnotationError(f"{self.path}: none of its {len(self.tumour)} tumour annotations overlaps "
                                  f"the {width}x{height} slide: are these the annotations of another slide?")
        return out


def annotation_stem(path) -> str:
    """The slide name an annotation or mask file belongs to: tumor_001.xml, tumor_001.geojson and
    tumor_001.mask.tif all belong to tumor_001."""
    name = Path(path).name
    for suffix in (".mask.tif", ".mask.tiff") + ANNOTATION_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name.rsplit(".", 1)[0]


def max_bytes(max_mb: float | None = None) -> tuple[int, float]:
    """The read bound in bytes (and MB) from `max_mb`, else $FASTGICN_MAX_ANNOTATION_MB, else 256 MB."""
    if max_mb is None:
        text = os.environ.get(MAX_MB_ENV)
        try:
            max_mb = float(text) if text else DEFAULT_MAX_MB
        except ValueError:
            raise AnnotationError(f"${MAX_MB_ENV}={text!r}: give the bound in MB, e.g. 512") from None
    if not (math.isfinite(max_mb) and max_mb > 0):
        raise AnnotationError(f"max annotation size {max_mb!r} MB: use a positive number of MB, e.g. 512")
    return int(max_mb * 1e6), float(max_mb)


def _read_bounded(path: Path, max_mb: float | None) -> bytes:
    limit, limit_mb = max_bytes(max_mb)
    try:
        with open(path, "rb") as fh:
            data = fh.read(limit + 1)
    except FileNotFoundError:
        raise AnnotationError(f"{path}: no such annotation file; check the path") from None
    except IsADirectoryError:
        raise AnnotationError(f"{path}: is a directory; give the annotation file (.xml or "
                              ".geojson)") from None
    except OSError as exc:
        raise AnnotationError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if len(data) > limit:
        raise AnnotationError(f"{path}: larger than the {limit_mb:g} MB bound on annotation files; if it is "
                              f"genuine, raise it with --max-annotation-mb (or ${MAX_MB_ENV})")
    return data


def read_annotations(path, *, tumour_groups=None, exclusion_groups=None, classes=None, exclude_classes=None,
                     max_mb: float | None = None) -> Annotations:
    """The tumour and exclusion polygons of an ASAP XML or QuPath GeoJSON file (see the module docstring).

    The format is told from the content (XML starts with '<'), not the suffix. `tumour_groups` /
    `exclusion_groups` (ASAP) and `classes` / `exclude_classes` (GeoJSON) replace the defaults. Raises
    `AnnotationError` for anything unreadable, a polygon with fewer than 3 points, a non-finite coordinate,
    an ASAP group that is neither tumour nor excluded, or a group/class filter matching no annotation.
    """
    from .asap import parse_asap
    from .geojson import parse_geojson

    path = Path(path)
    data = _read_bounded(path, max_mb)
    head = data[:64].lstrip(b"\xef\xbb\xbf \t\r\n")
    if head.startswith(b"<"):
        out = parse_asap(data, path, tuple(tumour_groups or DEFAULT_TUMOUR_GROUPS),
                         tuple(DEFAULT_EXCLUSION_GROUPS if exclusion_groups is None else exclusion_groups))
    elif head.startswith((b"{", b"[")):
        out = parse_geojson(data, path, None if not classes else tuple(classes), tuple(exclude_classes or ()))
    else:
        raise AnnotationError(f"{path}: neither XML nor JSON (it starts with {data[:16]!r}); give an ASAP "
                              ".xml or a QuPath .geojson export")
    if not out.tumour:
        out.warnings.append(f"{path}: no tumour annotation: the slide is all normal")
    return out


def polygon_ring(points, path: Path, name: str, what: str = "outline") -> np.ndarray:
    """`points` as an open (n, 2) float64 ring with no repeated neighbours; raises AnnotationError when they
    are not numbers, not finite or fewer than 3 distinct points."""
    try:
        xy = np.asarray(points, dtype=np.float64)
    except (TypeError, ValueError):
        raise AnnotationError(f"{path}: annotation {name!r}: its {what} has coordinates that are not "
                              "numbers; fix or delete it in the annotation tool") from None
    if xy.ndim != 2 or xy.shape[1] < 2 or len(xy) == 0:
        raise AnnotationError(f"{path}: annotation {name!r}: its {what} is not a list of [x, y] points; fix "
                              "or delete it in the annotation tool")
    xy = xy[:, :2]
    if not np.isfinite(xy).all():
        raise AnnotationError(f"{path}: annotation {name!r}: its {what} has a non-finite coordinate (NaN or "
                              "infinity); fix or delete it")
    if (np.abs(xy) > _MAX_COORDINATE).any():
        raise AnnotationError(f"{path}: annotation {name!r}: its {what} has a coordinate beyond "
                              f"{_MAX_COORDINATE:.0e} pixels, larger than any slide; fix or delete it")
    keep = np.ones(len(xy), bool)
    keep[1:] = (np.diff(xy, axis=0) != 0).any(axis=1)
    xy = xy[keep]
    if len(xy) > 1 and (xy[0] == xy[-1]).all():
        xy = xy[:-1]
    if len(xy) < 3:
        raise AnnotationError(f"{path}: annotation {name!r}: its {what} has {len(xy)} distinct point(s); a "
                              "polygon needs at least 3: fix or delete it in the annotation tool")
    return np.ascontiguousarray(xy)
