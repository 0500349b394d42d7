"""The tile grid: where the network's inputs are cut from a slide, and which of them hold tissue.

Two steps, kept apart (the tiatoolbox habit) so each can be tested alone:

- `tile_grid(lvl_width, lvl_height, tile_size, stride, downsample)`: a pure function of the geometry.
  Tiles of `tile_size` pixels of the read level start every `stride` pixels from (0, 0), in row-major
  order, as few as cover the level: the last row and column may run past the edge (they are padded
  with white when read). Returns (N, 4) int64 `l0_x, l0_y, w, h` in level-0 pixels.
- `tissue_tiles(slide, config)`: the grid for `config` (the `Resolution` from `config.level` or
  `config.target_mpp`: a stored level, or a finer one reduced to the target), then
  * with `config.tissue_prefilter`, only tiles touching the low-resolution tissue mask (dilated by
    `margin` mask pixels, so a tile is never lost to a mask that is a pixel short) are candidates;
  * each candidate is read at the read level and kept by `keep_tile`: background pixels are those
    whose R, G and B are all > `config.white_threshold`, the padding of an edge tile included, and the
    tissue fraction is 1 - background / tile_size^2. With `min_tissue_fraction == 0` a tile is kept iff
    one pixel is not background: the paper's rule (discard a tile only when every pixel is above 220
    in every channel). Otherwise it is kept iff the fraction is >= `min_tissue_fraction`.

The batch queue can skip the reading step (`read=False`) and apply `keep_tile` to the background count
the Cython tiler returns while it fills its batches, so every tile is read once.
"""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..config import TileConfig
from ..errors import ConfigError
from ..slide.base import Slide
from ..slide.resolution import Resolution, stored
from ..slide.tissue import TissueMask, tissue_mask

__all__ = ["tile_grid", "grid_shape", "read_level_for", "read_resolution_for", "keep_tile", "real_pixels", "tiles_touching_mask",
           "tile_background", "tissue_tiles"]


def grid_shape(lvl_width: int, lvl_height: int, tile_size: int, stride: int) -> tuple[int, int]:
    """(rows, columns) of the fewest tiles of `tile_size`, `stride` apart from 0, covering the level."""
    for name, v in (("lvl_width", lvl_width), ("lvl_height", lvl_height)):
        if not isinstance(v, (int, np.integer)) or v < 1:
            raise ConfigError(f"{name}={v!r}: use a positive number of pixels")
    if not isinstance(tile_size, (int, np.integer)) or tile_size < 1:
        raise ConfigError(f"tile_size={tile_size!r}: use a positive number of pixels")
    if not isinstance(stride, (int, np.integer)) or not 1 <= stride <= tile_size:
        raise ConfigError(f"stride={stride!r}: use 1..tile_size ({tile_size}); tiles must not leave gaps")

    def count(extent: int) -> int:
        return 1 + max(0, -(-(extent - tile_size) // stride))

    return count(int(lvl_height)), count(int(lvl_width))


def tile_grid(lvl_width: int, lvl_height: int, tile_size: int, stride: int,
              downsample: float = 1.0) -> np.ndarray:
    """All tile positions of a level `lvl_width` x `lvl_height`, as (N, 4) int64 `l0_x, l0_y, w, h`.

    Row-major (t_row, then t_col). Tile t_col starts at level pixel lvl_x = t_col * stride, i.e.
    l0_x = round(lvl_x * downsample); w = h = round(tile_size * downsample) level-0 pixels."""
    if not (isinstance(downsample, (int, float, np.integer, np.floating)) and downsample >= 1
            and math.isfinite(downsample)):
        raise ConfigError(f"downsample={downsample!r}: use a level downsample >= 1")
    n_rows, n_cols = grid_shape(lvl_width, lvl_height, tile_size, stride)
    lvl_x = np.arange(n_cols, dtype=np.int64) * stride
    lvl_y = np.arange(n_rows, dtype=np.int64) * stride
    l0_x = np.rint(lvl_x * float(downsample)).astype(np.int64)
    l0_y = np.rint(lvl_y * float(downsample)).astype(np.int64)
    side = int(round(tile_size * float(downsample)))
    grid = np.empty((n_rows * n_cols, 4), np.int64)
    grid[:, 0] = np.tile(l0_x, n_rows)
    grid[:, 1] = np.repeat(l0_y, n_cols)
    grid[:, 2] = side
    grid[:, 3] = side
    return grid


def read_resolution_for(slide: Slide, config: TileConfig) -> Resolution:
    """The pixels `config` asks for: stored level `config.level`, the resolution of `config.target_mpp` (a
    level within 15 %, or a finer level reduced: see fastgicn.slide.resolution), or level 0."""
    if config.level is not None:
        if config.level >= slide.level_count:
            raise ConfigError(f"TileConfig.level={config.level}: {slide.name} has levels "
                              f"0..{slide.level_count - 1} (downsamples {list(slide.level_downsamples)})")
        return stored(slide, config.level)
    if config.target_mpp is not None:
        return slide.resolution_for(target_mpp=config.target_mpp)
    return stored(slide, 0)


def read_level_for(slide: Slide, config: TileConfig) -> int:
    """The stored level `config` reads from (reduced further when `read_resolution_for` says so)."""
    return read_resolution_for(slide, config).level


def keep_tile(background: int | np.ndarray, n_pixels: int, min_tissue_fraction: float):
    """Whether a tile with `background` of its `n_pixels` pixels background holds enough tissue.

    `min_tissue_fraction == 0`: kept iff at least one pixel is not background (the paper's rule).
    Otherwise kept iff (n_pixels - background) / n_pixels >= min_tissue_fraction. Works elementwise; for an
    edge tile `n_pixels` and `background` count only the pixels on the slide (`real_pixels`)."""
    background = np.asarray(background)
    tissue = n_pixels - background
    if min_tissue_fraction == 0:
        return tissue > 0
    return tissue >= min_tissue_fraction * n_pixels


def real_pixels(grid: np.ndarray, extent: tuple[int, int], downsample: float, tile_size: int) -> np.ndarray:
    """(N,) pixels of each tile that lie on the slide (the rest is white padding), at the read resolution of
    `extent` (width, height) and `downsample`: the tissue fraction of an edge tile is counted over these."""
    lvl_x = np.floor(grid[:, 0] / downsample + 0.5).astype(np.int64)
    lvl_y = np.floor(grid[:, 1] / downsample + 0.5).astype(np.int64)
    w = np.clip(extent[0] - lvl_x, 0, tile_size)
    h = np.clip(extent[1] - lvl_y, 0, tile_size)
    return w * h


def tiles_touching_mask(grid: np.ndarray, mask: TissueMask, margin: int = 1) -> np.ndarray:
    """Boolean (N,): whether each tile's level-0 rectangle overlaps the mask dilated by `margin` pixels."""
    m = mask.mask
    # dilating by `margin` 3 x 3 steps (nothing beyond the edge) is a square of radius `margin`: a rectangle
    # meets the dilated mask exactly when the rectangle grown by `margin` meets the mask itself
    margin = max(0, int(margin))
    d = mask.downsample
    # summed-area table: any mask pixel in a rectangle is one lookup of four corners
    dtype = np.int32 if m.size < 2 ** 31 else np.int64
    sat = np.zeros((m.shape[0] + 1, m.shape[1] + 1), dtype)
    np.cumsum(m, axis=0, dtype=dtype, out=sat[1:, 1:])
    np.cumsum(sat[1:, 1:], axis=1, out=sat[1:, 1:])
    x0 = np.clip(grid[:, 0] // d, 0, m.shape[1])
    y0 = np.clip(grid[:, 1] // d, 0, m.shape[0])
    x1 = np.clip(-(-(grid[:, 0] + grid[:, 2]) // d), 0, m.shape[1])
    y1 = np.clip(-(-(grid[:, 1] + grid[:, 3]) // d), 0, m.shape[0])
    inside = (x1 > x0) & (y1 > y0)  # the dilated mask has no pixels beyond the mask's own
    if margin:
        x0, y0 = np.maximum(x0 - margin, 0), np.maximum(y0 - margin, 0)
        x1, y1 = np.minimum(x1 + margin, m.shape[1]), np.minimum(y1 + margin, m.shape[0])
    total = sat[y1, x1] - sat[y0, x1] - sat[y1, x0] + sat[y0, x0]
    return inside & (total > 0)


def tile_background(slide: Slide, grid: np.ndarray, level: int, tile_size: int,
                    white_threshold: int, workers: int = 1) -> np.ndarray:
    """Background pixel count (R, G and B all > white_threshold, padding included) of each tile of
    `grid`, read at `level` as `tile_size` x `tile_size` pixels. `workers` threads read in parallel."""
    counts = np.empty(len(grid), np.int64)
    if not len(grid):
        return counts

    def work(indices: range) -> None:
        buf = np.empty((tile_size, tile_size, 3), np.uint8)
        for i in indices:
            counts[i] = slide.read_into(buf, int(grid[i, 0]), int(grid[i, 1]), level, white_threshold)

    workers = max(1, min(int(workers), len(grid)))
    if workers == 1:
        work(range(len(grid)))
        return counts
    chunk = -(-len(grid) // (workers * 4))
    parts = [range(s, min(len(grid), s + chunk)) for s in range(0, len(grid), chunk)]
    with ThreadPoolExecutor(workers, thread_name_prefix="fastgicn-tiles") as pool:
        for f in [pool.submit(work, p) for p in parts]:
            f.result()
    return counts


def tissue_tiles(slide: Slide, config: TileConfig, *, mask: TissueMask | None = None, read: bool = True,
                 workers: int = 1, margin: int = 1, resolution: Resolution | None = None) -> np.ndarray:
    """The tiles of `slide` to segment: (N, 4) int64 `l0_x, l0_y, w, h` (see the module docstring).

    `mask` reuses a tissue mask already computed (otherwise one is made when `config.tissue_prefilter`);
    `read=False` stops after the prefilter (the caller applies `keep_tile` while reading);
    `workers` threads read candidate tiles; `resolution` replaces the one `config` names (the trainer asks for
    a downsample)."""
    if not isinstance(config, TileConfig):
        raise ConfigError(f"config must be a TileConfig, got {type(config).__name__}")
    level = resolution or read_resolution_for(slide, config)
    lvl_w, lvl_h = level.dimensions
    grid = tile_grid(lvl_w, lvl_h, config.tile_size, config.stride, level.downsample)
    if config.tissue_prefilter:
        if mask is None:
            mask = tissue_mask(slide)
        grid = grid[tiles_touching_mask(grid, mask, margin)]
    if not read:
        return grid
    background = tile_background(slide, grid, level, config.tile_size, config.white_threshold, workers)
    real = real_pixels(grid, level.dimensions, level.downsample, config.tile_size)
    return grid[keep_tile(background - (config.tile_size ** 2 - real), real, config.min_tissue_fraction)]
