"""Many slides into one output directory: what decides whether a slide's outputs can be kept (the run
fingerprint), a different slide that would replace them under the same name, and the failure manifest."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .config import TileConfig
from .errors import ConfigError
from .naming import FAILURES_NAME, output_paths, slide_identity
from .outputs.report import REPORT_FORMAT, outputs_complete

__all__ = ["ensure_out_dir", "model_fingerprint", "run_fingerprint", "existing_slide", "other_slide",
           "plan_slide", "write_failures"]


def ensure_out_dir(out_dir) -> Path:
    """Create the output directory once, up front, or say why it cannot be used."""
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"output directory {out_dir} cannot be created ({exc.strerror or exc}): "
                          "choose another -o") from None
    if not os.access(out_dir, os.W_OK):
        raise ConfigError(f"output directory {out_dir} is not writable: choose another -o")
    return out_dir


def run_fingerprint(slide, model_fp: str, config: TileConfig, stitch: str, truth=None, options=None) -> str:
    """What decides whether existing outputs can be kept: model, config, stitch mode, slide and truth contents,
    and the `options` that change an output (the GeoJSON's minimum region, the MPP given)."""
    h = hashlib.sha256()
    parts = {"model": model_fp, "config": config.to_dict(), "stitch": stitch, "format": REPORT_FORMAT,
             "slide": _content(slide), "truth": None if truth is None else _content(truth),
             "options": options or {}}
    h.update(json.dumps(parts, sort_keys=True, default=str).encode())
    return h.hexdigest()


def _content(path) -> str | None:
    """A file's content identity (not its path or time: a copied or moved slide is the same slide)."""
    ident = slide_identity(path)
    return None if ident is None else f"{ident['bytes']}:{ident['content']}"


def model_fingerprint(model) -> str:
    """sha256 of the model's name, kwargs, normalisation and weights (what makes two runs' outputs equal);
    `model` is a torch module or an engine backend holding one as `.model`."""
    from torch import nn

    from .engine.base import model_fingerprint as module_fingerprint

    module = model if isinstance(model, nn.Module) else getattr(model, "model", None)
    if not isinstance(module, nn.Module):
        raise ConfigError(f"cannot fingerprint {type(model).__name__}: pass a torch model or an engine backend")
    return module_fingerprint(module)


def existing_slide(out_dir, stem: str) -> dict | None:
    """The identity of the slide whose complete outputs are under `stem` in `out_dir` (None if there are none)."""
    try:
        report = json.loads(output_paths(out_dir, stem)["report"].read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(report, dict) or not report.get("complete"):
        return None
    slide = report.get("slide") or {}
    return slide.get("identity") or {"path": slide.get("path"), "content": None}


def other_slide(out_dir, stem: str, slide) -> str | None:
    """Why `slide` must not write over the complete outputs of a different slide under the same name, or None."""
    there = existing_slide(out_dir, stem)
    here = slide_identity(slide)
    if there is None or here is None or there.get("content") == here["content"]:
        return None
    return (f"{output_paths(out_dir, stem)['report']} holds the complete results of another slide named "
            f"{stem} ({there.get('path')}); segmenting {here['path']} would replace them: give it another -o, "
            "or --force to replace them")


def plan_slide(out_dir, slide, stem: str, truth, model_fp: str, config: TileConfig, stitch: str,
               options: dict, force: bool = False) -> tuple[str, str]:
    """What a run does with `slide`: ("run", its fingerprint), ("skip", its fingerprint) when its outputs are
    complete for that fingerprint, or ("fail", why) when it cannot be read or would replace another slide's
    outputs (`force` redoes and replaces). The plain run and the Ray driver decide alike."""
    try:
        fp = run_fingerprint(slide, model_fp, config, stitch, truth, options)
    except OSError as exc:
        what = "truth mask" if truth is not None and str(exc.filename) == str(truth) else "slide"
        return "fail", f"{what} {exc.filename or slide} cannot be read ({exc.strerror or exc}): check the path"
    if not force and outputs_complete(out_dir, stem, fp):
        return "skip", fp
    clash = None if force else other_slide(out_dir, stem, slide)
    return ("fail", clash) if clash else ("run", fp)


def write_failures(out_dir, failures: list[tuple[str, str, str]]) -> Path | None:
    """The failure manifest beside the outputs (slide, reason, time; tab-separated, a header line), or no
    manifest when nothing failed. `fastgicn segment --slides-from` reads its first column back."""
    path = Path(out_dir) / FAILURES_NAME
    if not failures:
        path.unlink(missing_ok=True)
        return None
    lines = ["# slide\treason\ttime: retry with fastgicn segment --slides-from " + str(path)]
    lines += ["\t".join(v.replace("\t", " ").replace("\n", " ") for v in row) for row in failures]
    from .outputs.atomic import atomic_path

    with atomic_path(path) as tmp:
        Path(tmp).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
