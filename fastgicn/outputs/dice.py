"""Dice of the segmented mask against a ground-truth mask slide, counted over the stitched rows as they stream."""
from __future__ import annotations

import numpy as np

from ..errors import ConfigError

__all__ = ["TruthDice"]


class TruthDice:
    """Counts |pred & truth|, |pred|, |truth| over the stitched rows; truth read from a mask slide at the
    output level (0 normal, > 127 tumour, aligned with the slide's level 0)."""

    CHUNK = 8192

    def __init__(self, truth, slide, downsample: float, width: int):
        from ..slide import open_slide

        self.path = truth if not isinstance(truth, np.ndarray) else "array"
        if isinstance(truth, np.ndarray) and truth.ndim == 2:
            truth = np.repeat(truth[:, :, None], 3, axis=2)
        self.reader = open_slide(truth)
        if tuple(self.reader.dimensions) != tuple(slide.dimensions):
            self.reader.close()
            raise ConfigError(f"truth mask {self.path} is {self.reader.dimensions[0]}x{self.reader.dimensions[1]} "
                              f"but the slide is {slide.dimensions[0]}x{slide.dimensions[1]}: the mask must be "
                              "aligned with the slide's level 0")
        from ..slide.resolution import resolution_at

        # the mask at the output's resolution: a level at that downsample, or a finer one box-reduced (a
        # 0/255 mask's mean is > 127 where at least half of the block is tumour)
        self.resolution = resolution_at(self.reader, downsample, tolerance=0.01)
        self.level, self.downsample, self.width = self.resolution, self.resolution.downsample, width
        self.inter = self.pred = self.truth = 0

    def add(self, y0: int, label: np.ndarray) -> None:
        n = len(label)
        for x in range(0, self.width, self.CHUNK):
            w = min(self.CHUNK, self.width - x)
            t = self.reader.read_region(int(round(x * self.downsample)), int(round(y0 * self.downsample)),
                                        self.level, w, n)[..., 0] > 127
            p = label[:, x:x + w]
            self.inter += int(np.count_nonzero(p & t))
            self.pred += int(np.count_nonzero(p))
            self.truth += int(np.count_nonzero(t))

    def result(self) -> dict:
        total = self.pred + self.truth
        return {"dice": 1.0 if total == 0 else 2.0 * self.inter / total, "truth": str(self.path),
                "intersection_pixels": self.inter, "predicted_pixels": self.pred, "truth_pixels": self.truth,
                "level": self.resolution.level, "reduction": self.resolution.integer_factor or self.resolution.factor}

    def close(self) -> None:
        self.reader.close()
