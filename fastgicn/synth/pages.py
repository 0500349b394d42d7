"""The associated images of a synthetic SVS: a slide label and a macro-camera view."""
from __future__ import annotations

import math

import numpy as np

LABEL_SIZE = (415, 422)  # width, height of the synthetic label image (an Aperio label's usual size)
_LABEL_PAPER = (250, 250, 247)
_LABEL_INK = (28, 30, 36)
_MACRO_GLASS = (208, 214, 218)  # the slide glass as a macro camera sees it, darker than brightfield white
# A 3 x 5 pixel font for the label's text: each glyph is 5 rows of 3 bits.
_GLYPHS = {
    "0": "111101101101111", "1": "010110010010111", "2": "111001111100111", "3": "111001111001111",
    "4": "101101111001001", "5": "111100111001111", "6": "111100111101111", "7": "111001010010010",
    "8": "111101111101111", "9": "111101111001111", "A": "010101111101101", "C": "111100100100111",
    "D": "110101101101110", "E": "111100111100111", "F": "111100111100100", "G": "111100101101111",
    "H": "101101111101101", "I": "111010010010111", "N": "110101101101101", "S": "111100111001111",
    "T": "111010010010010", "Y": "101101010010010", "-": "000000111000000", " ": "000000000000000",
}



def synthetic_label(seed: int, size: tuple[int, int] = LABEL_SIZE) -> np.ndarray:
    """A plausible slide label, `size` = (width, height): white paper with three lines of block text
    ("FASTGICN", "SYNTHETIC", "SEED <seed>") and a barcode of the seed's bits, in dark ink (uint8 RGB)."""
    w, h = size
    canvas = np.ones((h, w), bool)  # True = paper
    margin = max(2, w // 20)
    lines = ["FASTGICN", "SYNTHETIC", f"SEED {seed}"]
    scale = max(1, min((w - 2 * margin) // (4 * max(map(len, lines))), (h // 2) // (6 * len(lines))))
    y = margin
    for text in lines:
        x = margin
        for char in text:
            glyph = np.array([c == "1" for c in _GLYPHS[char]]).reshape(5, 3)
            block = np.kron(glyph, np.ones((scale, scale), bool))
            canvas[y:y + 5 * scale, x:x + 3 * scale][block[:h - y, :w - x]] = False
            x += 4 * scale
        y += 6 * scale
    # barcode: start bars, then 32 bits of the seed as wide (1) or narrow (0) bars, then stop bars
    bits = [1, 0, 1] + [(seed >> k) & 1 for k in range(31, -1, -1)] + [1, 0, 1]
    module = max(1, (w - 2 * margin) // sum(5 if bit else 3 for bit in bits))  # a bar and its gap
    top, bottom = max(y + margin, h - h // 4 - margin), h - margin
    x = margin
    for bit in bits:
        width = 3 * module if bit else module
        canvas[top:bottom, x:x + width] = False
        x += width + 2 * module
    return np.where(canvas[..., None], np.uint8(_LABEL_PAPER), np.uint8(_LABEL_INK)).astype(np.uint8)


def synthetic_macro(overview: np.ndarray, label: np.ndarray) -> np.ndarray:
    """A macro-camera view: the low-resolution slide `overview` and a reduced `label` side by side on
    slide glass (uint8 RGB; the label at the left end, as on a glass slide)."""
    h, w = overview.shape[:2]
    pad = max(4, h // 10)
    height = h + 2 * pad
    d = max(1, math.ceil(label.shape[0] / (height - 2 * pad)))  # integer box reduction of the label
    lh, lw = label.shape[0] // d, label.shape[1] // d
    small = label[:lh * d, :lw * d].reshape(lh, d, lw, d, 3).astype(np.uint32).sum(axis=(1, 3))
    small = ((small + d * d // 2) // (d * d)).astype(np.uint8)
    macro = np.empty((height, lw + w + 4 * pad, 3), np.uint8)
    macro[:] = np.uint8(_MACRO_GLASS)
    macro[pad:pad + lh, pad:pad + lw] = small
    macro[pad:pad + h, lw + 3 * pad:lw + 3 * pad + w] = overview
    return macro
