"""Helpers shared by the command modules: argument types."""
from __future__ import annotations

import argparse


def parse_size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size {text!r}: write it as WIDTHxHEIGHT, e.g. 20000x15000") from None
    if w <= 0 or h <= 0:
        raise argparse.ArgumentTypeError(f"size {text!r}: width and height must be positive")
    return w, h
