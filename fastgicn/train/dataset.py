"""Training patches from (slide, mask) pairs: the paper's grid and background rule, balancing, augmentation.

A *source* is anything with `read(l0_x, l0_y, size, downsample) -> (rgb uint8 size x size x 3, mask bool
size x size)` and `dimensions` (level-0 width, height): a slide with its mask file, or a synthetic slide
rendered on the fly. Batches are a pure function of (seed, iteration), so training resumes exactly.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..config import PAPER_WHITE_THRESHOLD
from ..errors import ConfigError, SlideError


def is_glass(rgb: np.ndarray, threshold: int = PAPER_WHITE_THRESHOLD) -> bool:
    """The paper's rule (3.1.1): a patch whose every pixel is above `threshold` in every channel is glass."""
    return bool((rgb > threshold).all())


class SyntheticSource:
    """A `fastgicn.synth.SyntheticSlide` as a patch source."""

    def __init__(self, synthetic_slide):
        self.slide = synthetic_slide
        self.dimensions = (synthetic_slide.width, synthetic_slide.height)
        self.name = f"synthetic(seed={synthetic_slide.seed})"

    def read(self, l0_x: int, l0_y: int, size: int, downsample: int):
        rgb, mask = self.slide.render(l0_x, l0_y, size, size, downsample=downsample)
        return rgb, mask > 127


class ArraySource:
    """An in-memory RGB image and its tumour mask (level 0 only; `downsample` > 1 averages pixel blocks)."""

    def __init__(self, rgb: np.ndarray, mask: np.ndarray, name: str = "array"):
        if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8 or mask.shape != rgb.shape[:2]:
            raise ConfigError(f"ArraySource {name}: need uint8 H x W x 3 pixels and an H x W mask, got "
                              f"{rgb.shape} {rgb.dtype} and {mask.shape}")
        self.rgb, self.mask, self.name = rgb, np.asarray(mask) > 0, name
        self.dimensions = (rgb.shape[1], rgb.shape[0])

    def read(self, l0_x: int, l0_y: int, size: int, downsample: int):
        span = size * downsample
        rgb = self.rgb[l0_y:l0_y + span, l0_x:l0_x + span]
        mask = self.mask[l0_y:l0_y + span, l0_x:l0_x + span]
        if downsample > 1:
            rgb = rgb.reshape(size, downsample, size, downsample, 3).mean((1, 3)).round().astype(np.uint8)
            mask = mask.reshape(size, downsample, size, downsample).mean((1, 3)) >= 0.5
        return rgb, mask


class SlideSource:
    """A slide file and its ground truth, read through `open_slide` as inference reads them: a patch at a
    downsample the pyramid lacks is a finer level box-reduced.

    The truth (`mask_path`, else `find_truth`) is a mask file (0 normal, 255 tumour, aligned to level 0; a
    0/255 mask's box mean is > 127 where at least half of the block is tumour), or ASAP XML / QuPath GeoJSON
    annotations (rasterised per patch on the patch's grid by the pixel-centre rule of
    `fastgicn.annotations.rasterise`; `annotation_rules` as for `read_annotations`), or none: an all-normal
    negative, allowed for slides named normal* (Camelyon16's tumour-free slides) and when an
    `annotations_dir` was searched (Camelyon16 ships no annotation for them)."""

    def __init__(self, slide_path, mask_path=None, *, annotations_dir=None, annotation_rules=None):
        from ..slide import open_slide  # the slide layer is optional for synthetic-only training

        slide_path = Path(slide_path)
        if mask_path is None:
            mask_path = find_truth(slide_path, annotations_dir)
            negative = annotations_dir is not None or slide_path.stem.lower().startswith("normal")
            if mask_path is None and not negative:
                raise SlideError(f"no ground truth for {slide_path}: expected "
                                 f"{default_mask_path(slide_path)} or {slide_path.stem}.xml / .geojson beside "
                                 "it (or pass --masks, or --annotations DIR); slides named normal* without one "
                                 "are taken as all normal")
        mask_path = Path(mask_path) if mask_path is not None else None
        if mask_path is not None and not mask_path.exists():
            raise SlideError(f"no tumour mask for {slide_path}: expected {mask_path} "
                             "(0 = normal, 255 = tumour, aligned to level 0); pass its path explicitly")
        self.truth_kind = "none" if mask_path is None else (
            "annotations" if mask_path.suffix.lower() in _ANNOTATION_SUFFIXES else "mask")
        self.slide = open_slide(slide_path)
        self.mask = open_slide(mask_path) if self.truth_kind == "mask" else None
        if self.mask is not None and tuple(self.mask.dimensions) != tuple(self.slide.dimensions):
            raise SlideError(f"mask {mask_path} is {self.mask.dimensions} but slide {slide_path} is "
                             f"{self.slide.dimensions}: the mask must be aligned to level 0")
        self.dimensions = tuple(self.slide.dimensions)
        self.name = slide_path.name
        self.annotations, self._renderers = None, {}
        self.warnings: list[str] = []
        if self.truth_kind == "annotations":
            from ..annotations import read_annotations

            self.annotations = read_annotations(mask_path, **(annotation_rules or {}))
            self.warnings = self.annotations.warnings + self.annotations.clip_warnings(*self.dimensions)
        elif self.truth_kind == "none":
            where = "beside it" + (f" or in {annotations_dir}" if annotations_dir is not None else "")
            self.warnings = [f"{slide_path}: no mask or annotation {where}: an all-normal negative"]
        self._paths = (slide_path, mask_path)

    # A worker process (DataLoader) needs its own handles: OpenSlide's caches and locks do not survive a fork,
    # and a handle does not pickle. The loader calls `reopen` in each worker; unpickling reopens too.
    def reopen(self) -> None:
        from ..slide import open_slide

        self.slide = open_slide(self._paths[0])
        self.mask = open_slide(self._paths[1]) if self.truth_kind == "mask" else None

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("slide", "mask")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.reopen()

    def _level(self, reader, downsample: int):
        """The `Resolution` of `reader` at `downsample`: a level within 1 %, or a finer one reduced."""
        from ..slide.resolution import resolution_at

        return resolution_at(reader, downsample, tolerance=0.01)

    def tissue_positions(self, size: int, downsample: int, white_threshold: int) -> np.ndarray:
        """Level-0 origins of whole patches that hold tissue (low-res prefilter, then any non-glass pixel)."""
        from ..config import TileConfig
        from ..tiling import tissue_tiles

        config = TileConfig(tile_size=size, min_tissue_fraction=0.0, tissue_prefilter=True,
                            white_threshold=white_threshold)
        grid = tissue_tiles(self.slide, config, resolution=self._level(self.slide, downsample))
        width, height = self.dimensions
        whole = (grid[:, 0] + grid[:, 2] <= width) & (grid[:, 1] + grid[:, 3] <= height)
        return grid[whole, :2]

    def read_mask(self, l0_x: int, l0_y: int, size: int, downsample: int) -> np.ndarray:
        if self.truth_kind == "none":
            return np.zeros((size, size), bool)
        if self.truth_kind == "annotations":  # patches start on multiples of the downsample (the grid)
            from ..annotations import MaskRenderer

            renderer = self._renderers.get(downsample)
            if renderer is None:
                renderer = self._renderers[downsample] = MaskRenderer(self.annotations, downsample)
            return renderer.render(l0_x // downsample, l0_y // downsample, size, size) > 0
        mask = self.mask.read_region(l0_x, l0_y, self._level(self.mask, downsample), size, size)
        return mask[..., 0] > 127

    def read(self, l0_x: int, l0_y: int, size: int, downsample: int):
        rgb = self.slide.read_region(l0_x, l0_y, self._level(self.slide, downsample), size, size)
        return rgb, self.read_mask(l0_x, l0_y, size, downsample)


_ANNOTATION_SUFFIXES = (".xml", ".geojson", ".json")


def find_truth(slide_path, annotations_dir=None) -> Path | None:
    """A slide's ground truth: SLIDE.mask.tif beside it, else SLIDE.xml / SLIDE.geojson / SLIDE.json beside
    it, else the same names in `annotations_dir` (matched by the slide's stem, as Camelyon16's images/ and
    annotations/ are); None when there is none."""
    slide_path = Path(slide_path)
    places = [slide_path.parent] + ([Path(annotations_dir)] if annotations_dir is not None else [])
    for place in places:
        names = (default_mask_path(slide_path).name,) + tuple(slide_path.stem + s
                                                              for s in _ANNOTATION_SUFFIXES)
        for name in names:
            if (place / name).is_file():
                return place / name
    return None


def default_mask_path(slide_path: Path) -> Path:
    """OUT.svs -> OUT.mask.tif, where `fastgicn synth` writes the ground truth."""
    from ..naming import mask_path_for

    return mask_path_for(slide_path)


@dataclass
class Patch:
    source: int
    l0_x: int
    l0_y: int
    tumour_fraction: float


class PatchDataset:
    """Patches of `size` pixels at `downsample`, on the paper's grid (stride = size), glass discarded.

    `positive_fraction` of each batch (in expectation) comes from patches with tumour, the rest from patches
    without, when both kinds exist. With `cache=True` the kept patches are held in memory (small datasets).
    """

    def __init__(self, sources, size: int = 512, downsample: int = 1, positive_fraction: float = 0.5,
                 cache: bool = False, white_threshold: int = PAPER_WHITE_THRESHOLD):
        if not sources:
            raise ConfigError("no training slides given: pass at least one slide (or use synthetic ones)")
        if not 0.0 <= positive_fraction <= 1.0:
            raise ConfigError(f"positive_fraction={positive_fraction}: use a fraction in [0, 1]")
        self.sources, self.size, self.downsample = list(sources), size, downsample
        self.positive_fraction = positive_fraction
        self.patches: list[Patch] = []
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for s, source in enumerate(self.sources):
            if hasattr(source, "tissue_positions"):
                # A slide file: candidates come from the low-resolution tissue mask and the Cython background
                # count, so glass is never decoded at full resolution; only the (lossless) mask is read here.
                for l0_x, l0_y in source.tissue_positions(size, downsample, white_threshold):
                    mask = source.read_mask(l0_x, l0_y, size, downsample)
                    self.patches.append(Patch(s, int(l0_x), int(l0_y), float(mask.mean())))
                continue
            for l0_x, l0_y in self._grid(source.dimensions, size * downsample):
                rgb, mask = source.read(l0_x, l0_y, size, downsample)
                if is_glass(rgb, white_threshold):
                    continue
                self.patches.append(Patch(s, l0_x, l0_y, float(mask.mean())))
                if cache:
                    self._cache[len(self.patches) - 1] = (rgb, mask)
        if not self.patches:
            raise ConfigError(f"no tissue patches of {size} px at downsample {downsample} in "
                              f"{[getattr(s, 'name', s) for s in self.sources]}: every patch is glass")
        fractions = np.array([p.tumour_fraction for p in self.patches])
        self.positive = np.flatnonzero(fractions > 0)
        self.negative = np.flatnonzero(fractions == 0)

    @staticmethod
    def _grid(dimensions, step: int):
        """The paper's grid: whole patches only, stride = patch size."""
        width, height = dimensions
        return ((x, y) for y in range(0, height - step + 1, step) for x in range(0, width - step + 1, step))

    def __len__(self) -> int:
        return len(self.patches)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        if index in self._cache:
            return self._cache[index]
        p = self.patches[index]
        return self.sources[p.source].read(p.l0_x, p.l0_y, self.size, self.downsample)

    def sample_indices(self, count: int, generator: torch.Generator) -> np.ndarray:
        """Balanced draw: each element is a positive patch with probability `positive_fraction`."""
        if len(self.positive) == 0 or len(self.negative) == 0:
            pool = self.positive if len(self.positive) else self.negative
            return pool[torch.randint(len(pool), (count,), generator=generator).numpy()]
        want_positive = torch.rand(count, generator=generator).numpy() < self.positive_fraction
        pos = self.positive[torch.randint(len(self.positive), (count,), generator=generator).numpy()]
        neg = self.negative[torch.randint(len(self.negative), (count,), generator=generator).numpy()]
        return np.where(want_positive, pos, neg)

    def batch(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 N x H x W x 3 images and int64 N x H x W labels (0 normal, 1 tumour)."""
        items = [self[int(i)] for i in indices]
        images = torch.from_numpy(np.stack([rgb for rgb, _ in items]))
        labels = torch.from_numpy(np.stack([mask for _, mask in items]).astype(np.int64))
        return images, labels


def augment(images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator,
            colour_jitter: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """Random flips, 90-degree rotations (labels follow) and brightness/contrast/saturation jitter.

    `images` is float N x 3 x H x W in 0..1 (square patches), `labels` N x H x W.
    """
    n = images.shape[0]
    flips = torch.rand(n, 2, generator=generator) < 0.5
    turns = torch.randint(4, (n,), generator=generator)
    jitter = 1 + colour_jitter * (2 * torch.rand(n, 3, generator=generator) - 1)
    out_images, out_labels = [], []
    for i in range(n):
        img, lab = images[i], labels[i]
        if flips[i, 0]:
            img, lab = img.flip(-1), lab.flip(-1)
        if flips[i, 1]:
            img, lab = img.flip(-2), lab.flip(-2)
        img, lab = torch.rot90(img, int(turns[i]), (-2, -1)), torch.rot90(lab, int(turns[i]), (-2, -1))
        brightness, contrast, saturation = jitter[i]
        img = img * brightness
        img = (img - img.mean()) * contrast + img.mean()
        grey = img.mean(0, keepdim=True)
        img = (img - grey) * saturation + grey
        out_images.append(img.clamp(0, 1))
        out_labels.append(lab)
    return torch.stack(out_images), torch.stack(out_labels)
