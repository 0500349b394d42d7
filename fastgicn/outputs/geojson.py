"""Tumour regions as QuPath GeoJSON: the FeatureCollection text of the polygons `polygons.py` traces, and the
pipeline's step (trace, drop specks, write).

GeoJSON as QuPath (0.4-0.6) reads it (`qupath.lib.io.PathObjectTypeAdapters`): a FeatureCollection whose
Features have an `id` (a UUID), a Polygon or MultiPolygon `geometry` in level-0 pixels (origin at the top
left of the full-resolution image), closed rings, and `properties` with `objectType` "annotation",
`classification` {"name", "color": [r, g, b]}, `measurements` (name -> number) and `metadata` (name ->
string; the slide's name is kept there). Coordinates are integers where they are integral, else rounded to
1/1000 pixel.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from .atomic import atomic_path
from .polygons import DEFAULT_MIN_REGION_PIXELS, DEFAULT_MIN_REGION_UM2, Regions, mask_to_polygons, min_region_area

TUMOR_CLASS = "Tumor"
TUMOR_COLOR = (200, 0, 0)  # QuPath's default red for "Tumor"


def geojson_features(regions: Regions | np.ndarray, *, mpp: float | None = None,
                     name: str = TUMOR_CLASS, color=TUMOR_COLOR, slide_name: str | None = None) -> str:
    """A GeoJSON FeatureCollection, as compact JSON text, with one QuPath annotation classified `name` per
    region.

    `mpp` (level 0) adds each region's area in square microns as a measurement; `slide_name` goes into the
    annotation's metadata as it is (any Unicode). No Python list per point (2 M points on a fragmented
    slide took 1.2 s as lists alone): integral coordinates (an integral scale) are typed out by NumPy in
    one pass, the text GEOS would write less its ".0"s; others are written by GEOS (`shapely.to_geojson`).
    """
    import shapely

    geoms = regions.geoms if isinstance(regions, Regions) else np.asarray(regions, object)
    if len(geoms) == 0:
        return '{"type":"FeatureCollection","features":[]}'
    geometry = _integral_geojson(geoms)
    if geometry is None:  # fractional (or huge) coordinates: GEOS writes them, integral ones lose ".0"
        geometry = [g.replace(".0,", ",").replace(".0]", "]") for g in shapely.to_geojson(geoms).tolist()]
    props = {"objectType": "annotation", "isLocked": False,
             "classification": {"name": name, "color": [int(c) for c in color]}}
    if slide_name:
        props["metadata"] = {"slide": str(slide_name)}
    fixed = json.dumps(props, separators=(",", ":"), ensure_ascii=False)[:-1]
    areas = (np.round(shapely.area(geoms) * mpp * mpp, 2).tolist() if mpp else None)
    ids = np.frombuffer(os.urandom(16 * len(geoms)), np.uint8).reshape(-1, 16).copy()
    ids[:, 6] = ids[:, 6] & 0x0F | 0x40  # random UUIDs (version 4, RFC 4122 variant), as uuid.uuid4 makes
    ids[:, 8] = ids[:, 8] & 0x3F | 0x80
    hx = ids.tobytes().hex()
    parts = []
    for i, g in enumerate(geometry):
        k = 32 * i
        uid = f"{hx[k:k + 8]}-{hx[k + 8:k + 12]}-{hx[k + 12:k + 16]}-{hx[k + 16:k + 20]}-{hx[k + 20:k + 32]}"
        extra = f',"measurements":{{"Area µm^2":{areas[i]!r}}}' if areas is not None else ""
        parts.append(f'{{"type":"Feature","id":"{uid}","geometry":{g},"properties":{fixed}{extra}}}}}')
    return '{"type":"FeatureCollection","features":[' + ",".join(parts) + "]}"


def _integral_geojson(geoms) -> list[str] | None:
    """GeoJSON geometry text of each Polygon/MultiPolygon, when every coordinate is a non-negative integer
    below 10^9 (an integral scale): the text GEOS writes with ".0" dropped, typed out with NumPy in one
    pass over all points (each point a fixed row of bytes, the unused ones masked out). None otherwise."""
    import shapely

    types = shapely.get_type_id(geoms)
    if not np.isin(types, (3, 6)).all() or shapely.is_empty(geoms).any():
        return None
    parts, part_geom = shapely.get_parts(geoms, return_index=True)
    rings, ring_part = shapely.get_rings(parts, return_index=True)
    counts = shapely.get_num_coordinates(rings)
    coords = shapely.get_coordinates(rings)
    if len(coords) == 0 or (counts == 0).any():
        return None
    if not ((coords >= 0).all() and (coords < 1e9).all() and (coords == np.floor(coords)).all()
            and not np.signbit(coords).any()):
        return None
    v = coords.astype(np.int64)
    n = len(v)
    ring_end = np.cumsum(counts)
    ring_start = ring_end - counts
    nr, npart = len(rings), len(parts)
    first_ring_of_part = np.ones(nr, bool)
    first_ring_of_part[1:] = ring_part[1:] != ring_part[:-1]
    last_ring_of_part = np.ones(nr, bool)
    last_ring_of_part[:-1] = ring_part[1:] != ring_part[:-1]
    last_part_of_geom = np.ones(npart, bool)
    last_part_of_geom[:-1] = part_geom[1:] != part_geom[:-1]
    width = max(1, len(str(int(v.max()))))
    cols = 8 + 2 * width  # [part [ring [ x , y ] ,|] ,|] ,
    buf = np.zeros((n, cols), np.uint8)
    use = np.zeros((n, cols), bool)
    first_pt, last_pt = ring_start, ring_end - 1
    buf[:, 0], buf[:, 1], buf[:, 2] = ord("["), ord("["), ord("[")
    use[first_pt[first_ring_of_part], 0] = True  # the part's list of rings opens
    use[first_pt, 1] = True  # the ring's list of points opens
    use[:, 2] = True
    for k, col0 in ((0, 3), (1, 4 + width)):
        x = v[:, k]
        digits = np.ones(n, np.int64)
        for p in range(1, width):
            digits += x >= 10 ** p
        for j in range(width):
            power = width - 1 - j
            buf[:, col0 + j] = ord("0") + (x // 10 ** power) % 10
            use[:, col0 + j] = power < digits
    buf[:, 3 + width], use[:, 3 + width] = ord(","), True
    c = 4 + 2 * width
    buf[:, c], use[:, c] = ord("]"), True  # the point closes
    buf[:, c + 1], use[:, c + 1] = ord(","), True  # next point, or the ring closes:
    buf[last_pt, c + 1] = ord("]")
    use[last_pt, c + 2] = True  # after a ring: next ring, or the part closes
    buf[:, c + 2] = ord(",")
    buf[last_pt[last_ring_of_part], c + 2] = ord("]")
    lp = last_pt[last_ring_of_part]  # the last point of each part, in part order
    use[lp[~last_part_of_geom], c + 3] = True  # next part of a MultiPolygon
    buf[:, c + 3] = ord(",")
    text = buf[use].tobytes().decode("ascii")
    per_point = use.sum(axis=1)
    ends = np.cumsum(per_point)[last_pt[last_ring_of_part][last_part_of_geom]].tolist()  # one per geometry
    starts = [0] + ends[:-1]
    multi = (types == 6).tolist()
    poly_head, multi_head = '{"type":"Polygon","coordinates":', '{"type":"MultiPolygon","coordinates":['
    return [multi_head + text[a:b] + "]}" if mu else poly_head + text[a:b] + "}"
            for a, b, mu in zip(starts, ends, multi)]


def write_geojson(path, collection: dict | str) -> Path:
    """Write a FeatureCollection (JSON text, or a dict) as compact UTF-8 JSON (names stay readable), atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as fh:
            # dumps, not dump: only the one-shot encoder runs in C (dump is ~10x slower on large files)
            fh.write(collection if isinstance(collection, str) else
                     json.dumps(collection, separators=(",", ":"), ensure_ascii=False, allow_nan=False))
            fh.flush()
            os.fsync(fh.fileno())
    return path


def tumour_geojson(mask: np.ndarray, scale, *, clip=None, mpp: float | None = None,
                   min_region_um2: float = DEFAULT_MIN_REGION_UM2,
                   min_region_pixels: float = DEFAULT_MIN_REGION_PIXELS,
                   slide_name: str | None = None) -> tuple[str, dict]:
    """The pipeline's step: polygons of `mask`, small regions dropped, as FeatureCollection JSON text; and what the
    report says about them (`kept`, `dropped` count and area, the rule, polygons repaired)."""
    min_px, rule = min_region_area(mpp, min_region_um2, min_region_pixels)
    regions = mask_to_polygons(mask, scale, clip=clip, min_area=min_px)
    info = {"kept": len(regions), "dropped": regions.dropped,
            "dropped_area_pixels_level0": regions.dropped_area,
            "dropped_area_mm2": None if not mpp else regions.dropped_area * mpp * mpp / 1e6,
            "min_region_um2": float(min_region_um2) if mpp else None,
            "min_region_pixels_level0": round(min_px, 3), "rule": rule, "repaired": regions.repaired}
    return geojson_features(regions, mpp=mpp, slide_name=slide_name), info
