"""QuPath GeoJSON: features, their object type and classification, their Polygon / MultiPolygon geometry."""
from __future__ import annotations

import json
from pathlib import Path

from .read import _ANNOTATION_OBJECTS, AnnotationError, Annotations, Region, polygon_ring


def _features(obj, path: Path) -> list:
    if isinstance(obj, list):
        items = obj
    elif isinstance(obj, dict) and obj.get("type") == "FeatureCollection":
        items = obj.get("features")
        if not isinstance(items, list):
            raise AnnotationError(f"{path}: a FeatureCollection whose 'features' is not a list: not a valid "
                                  "GeoJSON export")
    elif isinstance(obj, dict) and obj.get("type") == "Feature":
        items = [obj]
    elif isinstance(obj, dict) and obj.get("type") in ("Polygon", "MultiPolygon", "GeometryCollection"):
        items = [{"type": "Feature", "geometry": obj, "properties": {}}]
    else:
        kind = obj.get("type") if isinstance(obj, dict) else type(obj).__name__
        raise AnnotationError(f"{path}: JSON of type {kind!r}, not GeoJSON features: export the annotations "
                              "from QuPath as GeoJSON (a FeatureCollection)")
    out = []
    for i, item in enumerate(items):
        if isinstance(item, dict) and item.get("type") in ("Polygon", "MultiPolygon", "GeometryCollection"):
            item = {"type": "Feature", "geometry": item, "properties": {}}
        if not isinstance(item, dict) or item.get("type") != "Feature":
            raise AnnotationError(f"{path}: item {i} is not a GeoJSON Feature; export the annotations from "
                                  "QuPath as GeoJSON")
        out.append(item)
    return out


def _class_name(props: dict) -> str | None:
    c = props.get("classification")
    if isinstance(c, dict):
        c = c.get("name")
    return c if isinstance(c, str) and c else None


def _polygons(geometry, path: Path, name: str, skipped: list) -> list:
    """The Polygon coordinate lists of `geometry` (MultiPolygons and GeometryCollections opened)."""
    if geometry is None:
        skipped.append(f"{path}: annotation {name!r} has no geometry; skipped")
        return []
    if not isinstance(geometry, dict):
        raise AnnotationError(f"{path}: annotation {name!r}: its geometry is not a GeoJSON object")
    kind = geometry.get("type")
    if kind == "Polygon":
        return [geometry.get("coordinates")]
    if kind == "MultiPolygon":
        parts = geometry.get("coordinates")
        if not isinstance(parts, list):
            raise AnnotationError(f"{path}: annotation {name!r}: MultiPolygon coordinates are not a list")
        return parts
    if kind == "GeometryCollection":
        parts = geometry.get("geometries") or []
        if not isinstance(parts, list):
            raise AnnotationError(f"{path}: annotation {name!r}: GeometryCollection geometries are not a "
                                  "list")
        return [p for g in parts for p in _polygons(g, path, name, skipped)]
    skipped.append(f"{path}: annotation {name!r} is a {kind}, which has no area; skipped")
    return []


def _region(rings, path: Path, name: str, label) -> Region:
    if not isinstance(rings, list) or not rings:
        raise AnnotationError(f"{path}: annotation {name!r}: a Polygon needs a list of rings (outline, then "
                              "holes); fix or delete it")
    return Region(name, label, tuple(polygon_ring(r, path, name, "outline" if k == 0 else f"hole {k}")
                                     for k, r in enumerate(rings)))


def parse_geojson(data: bytes, path: Path, classes: tuple | None, exclude_classes: tuple) -> Annotations:
    try:
        obj = json.loads(data.decode("utf-8-sig"))
    except UnicodeDecodeError:
        raise AnnotationError(f"{path}: not UTF-8 text; give a QuPath GeoJSON export") from None
    except ValueError as exc:
        raise AnnotationError(f"{path}: not valid JSON ({exc}); give a QuPath GeoJSON export") from None
    except RecursionError:
        raise AnnotationError(f"{path}: JSON nested too deeply to be GeoJSON; give a QuPath GeoJSON "
                              "export") from None
    features = _features(obj, path)
    out = Annotations(path, [])
    found: dict[str | None, int] = {}
    other_objects: dict[str, int] = {}
    chosen = []
    for i, feature in enumerate(features):
        props = feature.get("properties") or {}
        if not isinstance(props, dict):
            props = {}
        name = str(props.get("name") or feature.get("id") or f"feature {i}")
        object_type = props.get("objectType", props.get("object_type"))
        if isinstance(object_type, str) and object_type.lower() not in _ANNOTATION_OBJECTS:
            other_objects[object_type] = other_objects.get(object_type, 0) + 1
            continue
        label = _class_name(props)
        polygons = _polygons(feature.get("geometry"), path, name, out.warnings)
        if not polygons:
            continue
        found[label] = found.get(label, 0) + 1
        for k, rings in enumerate(polygons):
            chosen.append((label, _region(rings, path, name if len(polygons) == 1 else f"{name} part {k + 1}",
                                          label)))
    for object_type, n in other_objects.items():
        out.warnings.append(f"{path}: {n} {object_type} object(s) skipped: only annotations are read")
    named = sorted(str(c) for c in found if c is not None)
    if classes is None:
        tumour_classes = [c for c in named if c not in exclude_classes]
        if len(tumour_classes) > 1:
            raise AnnotationError(f"{path}: annotations of several classes ({', '.join(tumour_classes)}): "
                                  "choose the tumour ones with --class (e.g. --class Tumor)")
    for label, region in chosen:
        if label is not None and label in exclude_classes:
            out.exclusion.append(region)
        elif classes is None or label in classes:
            out.tumour.append(region)
    if classes is not None and not out.tumour and chosen:
        have = (", ".join(named) + (" and unclassified" if None in found else "")) if named else \
            "only unclassified"
        raise AnnotationError(f"{path}: no annotation of class {', '.join(classes)}; the file has {have} "
                              "annotations: check --class")
    return out
