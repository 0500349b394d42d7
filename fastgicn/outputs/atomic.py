"""Files written under a hidden temporary name beside the target and renamed into place when complete, so a
killed run never leaves a truncated file under the final name; and the cleanup of what a killed run left."""
from __future__ import annotations

import contextlib
import json
import os
import secrets
from pathlib import Path

import numpy as np

from ..errors import SlideError

__all__ = ["temp_name", "atomic_path", "write_json", "remove_partials"]


def temp_name(path: Path) -> Path:
    """The hidden temporary name a file is written under before it is renamed to `path`."""
    return path.with_name(f".{path.name}.{secrets.token_hex(4)}.partial")


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; rename it to `path` when the block succeeds, delete it otherwise."""
    path = Path(path)
    if not path.parent.is_dir():
        raise SlideError(f"cannot write {path}: directory {path.parent} does not exist; create it first")
    tmp = temp_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as exc:
        raise SlideError(f"cannot write {path}: {exc.strerror or exc}; check free space and permissions "
                         f"in {path.parent}") from exc
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def write_json(path, obj) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "w") as fh:
            json.dump(obj, fh, indent=2, default=_json_default)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
    return path


def _json_default(obj):
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot write {type(obj).__name__} to JSON")


def remove_partials(directory, name: str) -> list[Path]:
    """Delete temporary files a killed run left for output `name` in `directory` (ours and the TIFF writer's)."""
    removed = []
    for p in Path(directory).glob(f".{name}.*"):
        if p.suffix in (".partial", ".spool") and p.is_file():
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
                removed.append(p)
    return removed
