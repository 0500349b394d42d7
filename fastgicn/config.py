"""`TileConfig`: the one validated IO configuration shared by trainer, tiler, engine and bench."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .errors import ConfigError

# The paper's background rule (3.1.1): a tile whose pixels are all above this in every channel is glass.
PAPER_WHITE_THRESHOLD = 220


@dataclass(frozen=True)
class TileConfig:
    """How a slide is cut into network inputs.

    `level` and `target_mpp` are alternatives: give at most one (neither means level 0).
    `min_tissue_fraction=0` with `tissue_prefilter=False` keeps exactly the tiles the paper keeps.
    """

    tile_size: int = 512
    overlap: int = 0
    level: int | None = None
    target_mpp: float | None = None
    min_tissue_fraction: float = 0.01
    tissue_prefilter: bool = True
    white_threshold: int = PAPER_WHITE_THRESHOLD
    batch_size: int = 8

    def __post_init__(self) -> None:
        if not isinstance(self.tile_size, int) or self.tile_size < 32 or self.tile_size % 8:
            raise ConfigError(f"tile_size={self.tile_size!r}: use a multiple of 8 of at least 32 (the paper uses 512)")
        if (not isinstance(self.overlap, int) or self.overlap < 0 or self.overlap % 2
                or self.overlap > self.tile_size // 2):
            raise ConfigError(f"overlap={self.overlap!r}: use an even number of pixels in 0..{self.tile_size // 2} "
                              "(half of tile_size at most)")
        if self.level is not None and self.target_mpp is not None:
            raise ConfigError(f"level={self.level} and target_mpp={self.target_mpp} both given: choose one")
        if self.level is not None and (not isinstance(self.level, int) or self.level < 0):
            raise ConfigError(f"level={self.level!r}: use a pyramid level index >= 0")
        if self.target_mpp is not None and not self.target_mpp > 0:
            raise ConfigError(f"target_mpp={self.target_mpp!r}: use microns per pixel > 0 (40x is about 0.25)")
        if not 0.0 <= self.min_tissue_fraction <= 1.0:
            raise ConfigError(f"min_tissue_fraction={self.min_tissue_fraction!r}: use a fraction in [0, 1]")
        if not 0 <= self.white_threshold <= 255:
            raise ConfigError(f"white_threshold={self.white_threshold!r}: use 0..255 (the paper uses 220)")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ConfigError(f"batch_size={self.batch_size!r}: use a positive integer")

    @property
    def stride(self) -> int:
        """Distance between tile origins, in pixels of the read level: neighbours share `overlap` pixels."""
        return self.tile_size - self.overlap

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "TileConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown TileConfig fields {unknown}; known fields are {sorted(known)}")
        return cls(**values)
