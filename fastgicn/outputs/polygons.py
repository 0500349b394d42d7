"""Tumour outlines: OpenCV contours of the reduced mask -> valid shapely polygons (GeoJSON text: geojson.py).

Convention (pixel edges): pixel (x, y) of the mask is the square [x, x+1) x [y, y+1); a polygon runs along the
edges of its pixels, so its area is exactly its pixel count and a one-pixel line keeps its area. OpenCV's
`findContours` walks through the *centres* of boundary pixels (a one-pixel line would be a zero-area
polygon), so we trace a 2x nearest-upsampled copy of the mask (padded by one pixel): a boundary point at
upsampled column u lies next to the pixel edge at x = u // 2 (and likewise for rows), which maps every
contour vertex onto a pixel corner. A region is an 8-connected group of pixels (OpenCV's rule, as in the
XS/XL split of `models/metrics.py`); its holes are the 4-connected background groups it encloses
(`RETR_CCOMP`: outer ring, then its holes; an island inside a hole is a region of its own).

Where two pixels of a region touch only at a corner, the traced ring passes that corner twice, which OGC
(shapely) calls invalid; those few polygons are repaired with `shapely.buffer(g, 0)` (checked: valid, same
area; else `shapely.make_valid(method="structure")`), which splits them at the corner (a Polygon, or a
MultiPolygon whose parts touch at points), area unchanged.
Every geometry written is valid; exterior rings are counter-clockwise and holes clockwise in the numbers
themselves (RFC 7946's right-hand rule; with y pointing down they look clockwise on screen). QuPath reads
rings with JTS and does not depend on orientation.
"""
from __future__ import annotations

import concurrent.futures
import math
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError

# Without an MPP, regions are filtered by level-0 pixels: 1600 px is 100 um^2 at 0.25 um/px (40x).
DEFAULT_MIN_REGION_UM2 = 100.0  # about one tumour cell (10-12 um across); smaller specks are noise
DEFAULT_MIN_REGION_PIXELS = 1600


@dataclass
class Regions:
    """Tumour regions as shapely geometries (Polygon or MultiPolygon, valid) in level-0 pixels."""

    geoms: np.ndarray  # object array, one geometry per 8-connected region kept
    repaired: int = 0  # how many needed make_valid (corner-touching pixels)
    dropped: int = 0  # regions under `min_area`, left out
    dropped_area: float = 0.0  # their area in level-0 pixels

    def __len__(self) -> int:
        return len(self.geoms)

    @property
    def areas(self) -> np.ndarray:
        """Area of each region in level-0 pixels (holes excluded)."""
        import shapely

        return shapely.area(self.geoms) if len(self.geoms) else np.zeros(0)


# Masks under this many pixels, or of fewer regions, are traced on one thread: splitting costs more than it
# saves there (a 4096^2 mask of 34 blobs is one 0.12 s trace).
PARALLEL_MIN_PIXELS = 1 << 21
PARALLEL_MIN_REGIONS = 1000


def mask_to_polygons(mask: np.ndarray, scale: float | tuple[float, float] = 1.0, *,
                     clip: tuple[float, float] | None = None, min_area: float = 0.0,
                     threads: int | None = None) -> Regions:
    """One valid Polygon/MultiPolygon per 8-connected region of a 2-D mask, traced along pixel edges.

    `scale` is level-0 pixels per mask pixel (x, y); `clip` the level-0 width and height (vertices on a
    partial edge block are pulled back onto the slide); regions whose area (holes excluded, level-0 pixels,
    after clipping) is under `min_area` are left out and counted. See the module docstring for the convention.
    `threads` (default: the usable cores) trace horizontal strips of a large mask at once (`_strips`); the
    regions are the same as one trace gives, in raster order of their first pixels (top, then left).
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ConfigError(f"mask_to_polygons needs a 2-D mask, got shape {mask.shape}")
    sx, sy = (float(scale), float(scale)) if np.isscalar(scale) else (float(scale[0]), float(scale[1]))
    if not (sx > 0 and sy > 0 and math.isfinite(sx) and math.isfinite(sy)):
        raise ConfigError(f"scale={scale}: use positive level-0 pixels per mask pixel")
    if threads is None:
        from ..cpus import usable_cpus

        threads = usable_cpus()
    h, w = mask.shape
    if h == 0 or w == 0 or not mask.any():
        return Regions(np.empty(0, object))
    import cv2

    m = np.ascontiguousarray(mask.astype(bool, copy=False).view(np.uint8))
    parallel = threads > 1 and m.size >= PARALLEL_MIN_PIXELS and h >= 2 * threads
    parts = []
    labels = stats = None
    gone = None  # per label: removed before tracing
    if parallel or min_area > 0:
        _, labels, stats, _ = cv2.connectedComponentsWithStats(m, connectivity=8, ltype=cv2.CV_32S)
    if min_area > 0:
        area = _region_areas(labels, stats, sx, sy, clip)
        if area is not None:
            # specks go before tracing (on a fragmented slide 34,000 of 40,000 regions): removing an
            # 8-separated region changes no other region's rings. Regions within rounding of the threshold
            # are traced and decided on their polygon's area, as every region was before.
            exact = sx.is_integer() and sy.is_integer()  # else vertices are rounded to 1/1000 pixel
            slack = 0.0 if exact else 2e-3 * stats[:, cv2.CC_STAT_AREA] * (sx + sy)
            gone = area + slack < min_area
            gone[0] = False
            if gone.any():
                parts.append(Regions(np.empty(0, object), dropped=int(gone.sum()),
                                     dropped_area=float(area[gone].sum())))
                m = (m & ~gone[labels]).view(np.uint8)
            else:
                gone = None
    traced = 0 if stats is None else len(stats) - 1 - (0 if gone is None else int(gone.sum()))
    if parallel and traced >= PARALLEL_MIN_REGIONS:
        parts += _strips(m, labels, stats, gone, threads, sx, sy, clip, min_area)
    else:
        del labels
        parts.append(_trace(m, 0, sx, sy, clip, min_area))
    return _merge(parts)


def _region_areas(labels: np.ndarray, stats: np.ndarray, sx: float, sy: float, clip) -> np.ndarray | None:
    """Area of each 8-connected region in level-0 pixels after clipping (what its polygon's area is, before
    rounding), from its pixel count and its pixels in the last column and row; None when `clip` cuts deeper
    than the last pixel (every region is then traced and measured)."""
    import cv2

    h, w = labels.shape
    area = stats[:, cv2.CC_STAT_AREA].astype(np.float64) * (sx * sy)
    if clip is None:
        return area
    cx, cy = float(clip[0]), float(clip[1])
    if (w - 1) * sx > cx or (h - 1) * sy > cy:
        return None
    dx, dy = min(sx, max(0.0, w * sx - cx)), min(sy, max(0.0, h * sy - cy))  # lost from the last column / row
    n = len(area)
    if dx:
        area -= dx * sy * np.bincount(labels[:, -1], minlength=n)
    if dy:
        area -= dy * sx * np.bincount(labels[-1, :], minlength=n)
    if dx and dy:
        area[labels[-1, -1]] += dx * dy
    return area


def _strips(m: np.ndarray, labels: np.ndarray, stats: np.ndarray, gone: np.ndarray | None, threads: int,
            sx, sy, clip, min_area) -> list[Regions]:
    """Trace `threads` horizontal strips of `m` on as many threads (OpenCV, shapely and NumPy let go of the
    GIL). A region with pixels on both sides of a cut (it has pixels in both rows next to the cut: `labels`,
    the 8-connected labelling, tells; `gone`: regions removed from `m` already) is left out of the strips
    and traced on its own, from a mask of the regions crossing cuts over the rows they span. Every other
    region lies inside one strip with its holes (a hole is enclosed by its region's pixels), and tracing it
    there, the strip padded with background, gives the rings a trace of the whole mask gives: the regions
    left out are 8-separated from it, so removing them changes none of its rings."""
    import cv2

    h = m.shape[0]
    n_labels = len(stats)
    cuts = [round(h * k / threads) for k in range(threads + 1)]
    crossing = np.zeros(n_labels, bool)
    for c in cuts[1:-1]:
        above = np.zeros(n_labels, bool)
        above[labels[c - 1]] = True
        crossing[labels[c][above[labels[c]]]] = True
    crossing[0] = False
    if gone is not None:
        crossing &= ~gone  # removed already
    areas = stats[:, cv2.CC_STAT_AREA].astype(np.int64)
    kept = areas[1:].sum() - (0 if gone is None else areas[gone].sum())
    if 2 * areas[crossing].sum() > kept:
        # most of the tumour is in regions that cross a cut (a few large ones): they would be traced on one
        # thread anyway, after the strips; one trace of the whole mask is cheaper
        return [_trace(m, 0, sx, sy, clip, min_area)]
    jobs = []
    if crossing.any():  # the box the crossing regions span: only there do strips lose pixels
        top, left = stats[crossing, cv2.CC_STAT_TOP], stats[crossing, cv2.CC_STAT_LEFT]
        r0, r1 = int(top.min()), int((top + stats[crossing, cv2.CC_STAT_HEIGHT]).max())
        c0, c1 = int(left.min()), int((left + stats[crossing, cv2.CC_STAT_WIDTH]).max())
    for a, b in zip(cuts[:-1], cuts[1:]):
        strip = m[a:b]
        if crossing.any() and max(a, r0) < min(b, r1):
            strip = strip.copy()
            ya, yb = max(a, r0), min(b, r1)
            strip[ya - a:yb - a, c0:c1] &= ~crossing[labels[ya:yb, c0:c1]]
        jobs.append((strip, a))
    if crossing.any():
        jobs.append((crossing[labels[r0:r1]].view(np.uint8), r0))
    del labels
    with concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="fastgicn-polygons") as pool:
        futures = [pool.submit(_trace, strip, y0, sx, sy, clip, min_area) for strip, y0 in jobs]
        return [f.result() for f in futures]


def _merge(parts: list[Regions]) -> Regions:
    """The regions of the parts as one Regions, in raster order of their first pixels (whatever the number of
    strips: the GeoJSON does not depend on the cores)."""
    import shapely

    geoms = np.concatenate([p.geoms for p in parts])
    if len(geoms) > 1:
        # a region's key is its first pixel in raster order: the leftmost vertex on its top edge (unique)
        top = shapely.bounds(geoms)[:, 1]
        coords, index = shapely.get_coordinates(geoms, return_index=True)
        on_top = coords[:, 1] == top[index]
        left = np.full(len(geoms), np.inf)
        np.minimum.at(left, index[on_top], coords[on_top, 0])
        geoms = geoms[np.lexsort((left, top))]
    return Regions(geoms, repaired=sum(p.repaired for p in parts), dropped=sum(p.dropped for p in parts),
                   dropped_area=float(sum(p.dropped_area for p in parts)))


def _trace(m: np.ndarray, y0: int, sx: float, sy: float, clip, min_area: float) -> Regions:
    """The regions of the 0/1 uint8 mask `m`, whose first row is row `y0` of the whole mask."""
    import cv2
    import shapely

    empty = Regions(np.empty(0, object))
    h, w = m.shape
    if not m.any():
        return empty
    # 2x nearest upsample with one pixel of background around (cv2.resize at exactly 2x repeats each pixel)
    up = cv2.copyMakeBorder(cv2.resize(m, (2 * w, 2 * h), interpolation=cv2.INTER_NEAREST), 1, 1, 1, 1,
                            cv2.BORDER_CONSTANT, value=0)
    contours, hierarchy = cv2.findContours(up, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    del up
    if not contours:
        return empty
    # rings in polygon order, each outer ring followed by its holes: the contours are put in that order
    # before their points are joined (sorting 40,000 rings, not millions of points)
    parent = hierarchy[0][:, 3]
    outer = np.flatnonzero(parent < 0)
    poly_of_outer = np.full(len(contours), -1)
    poly_of_outer[outer] = np.arange(len(outer))
    poly_of_ring = np.where(parent < 0, poly_of_outer, poly_of_outer[np.maximum(parent, 0)])
    ring_order = np.lexsort((parent >= 0, poly_of_ring))  # by polygon, the shell first
    contours = [contours[i] for i in ring_order.tolist()]
    lengths = np.fromiter((len(c) for c in contours), np.int64, len(contours))
    xy = np.concatenate(contours).reshape(-1, 2) >> 1  # upsampled boundary pixel -> pixel corner
    del contours
    ring = np.repeat(np.arange(len(lengths)), lengths)
    # diagonal steps of the upsampled contour collapse onto one corner: drop repeated vertices (cyclically)
    starts = np.cumsum(lengths) - lengths
    prev = np.arange(len(xy)) - 1
    prev[starts] = starts + lengths - 1
    keep = (xy != xy[prev]).any(axis=1)
    xy, ring = xy[keep], ring[keep]
    coords = (xy + (0, y0)).astype(np.float64) * (sx, sy)
    if clip is not None:
        np.minimum(coords, (float(clip[0]), float(clip[1])), out=coords)
    if not (sx.is_integer() and sy.is_integer()):
        coords = np.round(coords, 3)  # what the GeoJSON holds; rounding is monotonic, so topology is kept
    rings = shapely.linearrings(coords, indices=ring)
    geoms = shapely.polygons(rings, indices=poly_of_ring[ring_order])
    # the shoelace area is right even for a ring pinched at a corner, so small regions go before any repair
    areas = shapely.area(geoms)
    small = areas < min_area
    dropped, dropped_area = int(small.sum()), float(areas[small].sum())
    geoms = geoms[~small]
    bad = _invalid(geoms, _corner_touch_candidates(m, y0, xy, ring, poly_of_ring[ring_order], small, sx, sy,
                                                          clip))
    if len(bad):
        geoms[bad] = _repair_pinched(geoms[bad])
    geoms = shapely.orient_polygons(geoms, exterior_cw=False)
    return Regions(geoms, repaired=len(bad), dropped=dropped, dropped_area=dropped_area)


def _corner_touch_candidates(m, y0, xy, ring, poly_of_ring, small, sx, sy, clip):
    """Indices (among the kept regions) of the polygons that can be invalid, or None for "any of them".

    A ring traced along pixel edges is simple, and apart from the other rings of its region, except at a pixel
    corner where two pixels of the region touch diagonally (a 2x2 block [[1,0],[0,1]] or [[0,1],[1,0]]): there
    the boundary meets itself and the ring turns, so the corner is one of its vertices. Only polygons with such
    a vertex are checked. Scaling, clipping and rounding keep this only while they keep the pixel-corner grid
    strictly ordered; otherwise (a clip inside the last pixel's span, or a tiny scale) every polygon is checked.
    """
    h, w = m.shape
    for first, n, s, c in ((0, w, sx, None if clip is None else clip[0]),
                           (y0, h, sy, None if clip is None else clip[1])):
        grid = np.arange(first, first + n + 1, dtype=np.float64) * s
        if c is not None:
            np.minimum(grid, float(c), out=grid)
        if not (sx.is_integer() and sy.is_integer()):
            grid = np.round(grid, 3)
        if not (np.diff(grid) > 0).all():
            return None
    p = np.pad(m.astype(bool, copy=False), 1)  # corner (x, y) is shared by pixels (x-1..x, y-1..y)
    a, b, c, d = p[:-1, :-1], p[:-1, 1:], p[1:, :-1], p[1:, 1:]
    diag = (a == d) & (b == c) & (a != b)
    if not diag.any():
        return np.zeros(0, np.int64)
    hit = diag[xy[:, 1], xy[:, 0]]
    polys = np.unique(poly_of_ring[ring[hit]])
    kept_index = np.cumsum(~small) - 1  # polygon index -> index among the kept ones
    return kept_index[polys[~small[polys]]]


def _invalid(geoms, candidates):
    """Indices of the invalid geometries, checking only `candidates` (None: all)."""
    import shapely

    if candidates is None:
        return np.flatnonzero(~shapely.is_valid(geoms))
    if len(candidates) == 0:
        return candidates
    return candidates[~shapely.is_valid(geoms[candidates])]


def _repair_pinched(geoms: np.ndarray) -> np.ndarray:
    """Valid equivalents of polygons whose rings touch themselves at pixel corners, area unchanged.

    `buffer(0)` splits such rings at the corner a third of the time `make_valid(method="structure")` takes (on a
    fragmented slide: 0.2 s against 0.58 s for 815 polygons); it is only trusted where its result is a valid
    Polygon or MultiPolygon of the same area, and make_valid repairs the rest (none, on pixel-edge rings,
    which meet themselves only at vertices and never cross)."""
    import shapely

    fixed = shapely.buffer(geoms, 0)
    ok = np.isin(shapely.get_type_id(fixed), (3, 6)) & shapely.is_valid(fixed)
    area = shapely.area(geoms)
    ok &= np.abs(shapely.area(fixed) - area) <= 1e-9 * np.maximum(area, 1.0)
    if not ok.all():
        rest = np.flatnonzero(~ok)
        fixed[rest] = [_repair(g) for g in shapely.make_valid(geoms[rest], method="structure",
                                                               keep_collapsed=False)]
    return fixed


def _repair(fixed):
    """The polygonal parts of what make_valid gave (a Polygon or a MultiPolygon)."""
    import shapely
    from shapely.geometry import MultiPolygon, Polygon

    if isinstance(fixed, (Polygon, MultiPolygon)):
        return fixed
    parts = [p for p in shapely.get_parts(fixed) if isinstance(p, (Polygon, MultiPolygon))]
    polys = [q for p in parts for q in (p.geoms if isinstance(p, MultiPolygon) else [p])]
    return polys[0] if len(polys) == 1 else MultiPolygon(polys)


def min_region_area(mpp: float | None, min_region_um2: float = DEFAULT_MIN_REGION_UM2,
                    min_region_pixels: float = DEFAULT_MIN_REGION_PIXELS) -> tuple[float, str]:
    """The smallest region kept, in level-0 pixels, and how it was chosen (by area in um^2 when the slide
    has an MPP, else by pixel count)."""
    for name, v in (("min_region_um2", min_region_um2), ("min_region_pixels", min_region_pixels)):
        if not (v >= 0 and math.isfinite(v)):
            raise ConfigError(f"{name}={v}: use a finite number >= 0 (0 keeps every region)")
    if mpp:
        return min_region_um2 / (mpp * mpp), f"area >= {min_region_um2:g} um^2 (slide MPP {mpp:g} um/px)"
    return float(min_region_pixels), (f"no MPP known: area >= {min_region_pixels:g} level-0 pixels "
                                      "(1600 is 100 um^2 at 0.25 um/px); give the MPP to filter by um^2")
