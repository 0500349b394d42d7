"""The demo: a synthetic slide with its ground-truth mask, and the shipped demo weights."""
from __future__ import annotations

from pathlib import Path

from .outputs.atomic import remove_partials

__all__ = ["DEMO_WEIGHTS", "DEMO_SLIDE_NAME", "DEMO_SIZE", "demo_slide"]

DEMO_WEIGHTS = Path(__file__).resolve().parent / "weights" / "demo_synthetic.pt"
DEMO_SLIDE_NAME = "synthetic_demo.svs"
DEMO_SIZE = (28000, 28000)  # ~1,700 tissue tiles: about a minute on 2 CPU cores with the demo weights (28-43 tiles/s)


def demo_slide(out_dir, size: tuple[int, int] = DEMO_SIZE, seed: int = 0, log=None) -> tuple[Path, Path]:
    """OUT_DIR/synthetic_demo.svs and its ground-truth mask, made once and reused while both exist (the
    writer renames complete files into place, so an existing file is a complete one). A different size or
    seed than the existing one makes a new slide named after them."""
    from .synth import write_synthetic_slide

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = DEMO_SLIDE_NAME if (tuple(size), seed) == (DEMO_SIZE, 0) else \
        f"synthetic_demo_{size[0]}x{size[1]}_seed{seed}.svs"
    slide = out_dir / name
    mask = slide.with_name(slide.stem + ".mask.tif")
    if slide.is_file() and mask.is_file():
        return slide, mask
    for p in (slide, mask):  # what a killed run left half-written
        remove_partials(out_dir, p.name)
    if log:
        log(f"making a synthetic slide {slide} ({size[0]} x {size[1]} pixels, seed {seed}) and its mask")
    return write_synthetic_slide(slide, size[0], size[1], seed=seed)
