"""ASAP XML (the Camelyon16 ground truth): annotations, their groups, and which groups are tumour."""
from __future__ import annotations

from pathlib import Path
from xml.etree.ElementTree import ParseError

import defusedxml
import defusedxml.ElementTree as SafeET

from .read import _AREA_TYPES_ASAP, _POINT_TYPES_ASAP, AnnotationError, Annotations, Region, polygon_ring


def _number(text: str | None, path: Path, name: str, axis: str) -> float:
    """A coordinate; some ASAP versions write a decimal comma (1234,5) under European locales."""
    try:
        return float((text or "").replace(",", "."))
    except ValueError:
        raise AnnotationError(f"{path}: annotation {name!r}: coordinate {axis}={text!r} is not a number; fix "
                              "or delete it in ASAP") from None


def _group_kind(group: str, parents: dict, tumour: tuple, exclusion: tuple) -> str | None:
    """"tumour", "exclusion" or None for `group`, following PartOfGroup up the group tree."""
    seen = set()
    while group is not None and group not in seen:
        if group in tumour:
            return "tumour"
        if group in exclusion:
            return "exclusion"
        seen.add(group)
        group = parents.get(group)
    return None


def parse_asap(data: bytes, path: Path, tumour_groups: tuple, exclusion_groups: tuple) -> Annotations:
    try:
        root = SafeET.fromstring(data, forbid_dtd=True, forbid_entities=True, forbid_external=True)
    except defusedxml.DefusedXmlException as exc:
        raise AnnotationError(f"{path}: refused: the XML declares a DTD, entities or external references "
                              f"({type(exc).__name__}); ASAP annotation files need none of them") from None
    except ParseError as exc:
        raise AnnotationError(f"{path}: not well-formed XML ({exc}); give an ASAP annotation file") from None
    if root.tag != "ASAP_Annotations":
        raise AnnotationError(f"{path}: the XML's root element is <{root.tag}>, not <ASAP_Annotations>: not "
                              "an ASAP annotation file")
    parents = {}
    for group in root.iter("Group"):
        parent = group.get("PartOfGroup")
        parents[group.get("Name")] = None if parent in (None, "", "None") else parent
    out = Annotations(path, [])
    unknown = {}
    for i, ann in enumerate(root.iter("Annotation")):
        name = ann.get("Name") or f"annotation {i}"
        group = ann.get("PartOfGroup") or "None"
        kind = _group_kind(group, parents, tumour_groups, exclusion_groups)
        if kind is None:
            unknown.setdefault(group, name)
            continue
        kind_of_shape = (ann.get("Type") or "Polygon").lower()
        if kind_of_shape in _POINT_TYPES_ASAP:
            out.warnings.append(f"{path}: annotation {name!r} is a {ann.get('Type')}, which has no area; "
                                "skipped")
            continue
        if kind_of_shape not in _AREA_TYPES_ASAP:
            out.warnings.append(f"{path}: annotation {name!r} has type {ann.get('Type')!r}; read as a "
                                "polygon through its points")
        coords = ann.findall("./Coordinates/Coordinate")
        try:
            coords.sort(key=lambda c: int(c.get("Order", "0")))
        except ValueError:
            raise AnnotationError(f"{path}: annotation {name!r}: a Coordinate's Order is not an integer; fix "
                                  "it in ASAP") from None
        points = [(_number(c.get("X"), path, name, "X"), _number(c.get("Y"), path, name, "Y"))
                  for c in coords]
        if not points:
            raise AnnotationError(f"{path}: annotation {name!r} has no coordinates; a polygon needs at least "
                                  "3 points: delete it in ASAP")
        region = Region(name, group, (polygon_ring(points, path, name),))
        (out.tumour if kind == "tumour" else out.exclusion).append(region)
    if unknown:
        listed = ", ".join(f"{g!r} (e.g. annotation {n!r})" for g, n in list(unknown.items())[:5])
        raise AnnotationError(f"{path}: group {listed} is neither tumour ({', '.join(tumour_groups)}) nor "
                              f"cut out ({', '.join(exclusion_groups) or 'none'}): name it with "
                              "--tumour-groups or --exclusion-groups")
    if not out.tumour and out.exclusion:
        raise AnnotationError(f"{path}: no annotation in the tumour groups ({', '.join(tumour_groups)}), "
                              f"only {len(out.exclusion)} cut out: check --tumour-groups")
    return out
