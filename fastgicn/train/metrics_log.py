"""The run folder's metrics: metrics.csv and metrics.jsonl (one row per logged iteration and per validation,
appended, so a resumed run continues them), and TensorBoard scalars when the tensorboard package is
installed."""
from __future__ import annotations

import csv
import json
from pathlib import Path

__all__ = ["MetricsLog", "FIELDS"]

FIELDS = ("kind", "iteration", "loss", "ce", "loc", "lr", "iterations_per_s", "patches_per_s", "data_wait",
          "dice", "patches", "seconds")


class MetricsLog:
    """`write(record)`: a dict with `kind` ("train" or "val"), `iteration` and some of FIELDS."""

    def __init__(self, out_dir, tensorboard: bool | None = None):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.csv_path, self.jsonl_path = self.out_dir / "metrics.csv", self.out_dir / "metrics.jsonl"
        new_csv = not self.csv_path.exists() or self.csv_path.stat().st_size == 0
        self._csv_file = open(self.csv_path, "a", newline="", encoding="utf-8")
        self._csv = csv.DictWriter(self._csv_file, fieldnames=FIELDS, extrasaction="ignore")
        if new_csv:
            self._csv.writeheader()
        self._jsonl = open(self.jsonl_path, "a", encoding="utf-8")
        self._board = _summary_writer(self.out_dir / "tensorboard") if tensorboard is not False else None

    def write(self, record: dict) -> None:
        self._csv.writerow(record)
        self._jsonl.write(json.dumps(record) + "\n")
        self._csv_file.flush()
        self._jsonl.flush()
        if self._board is not None:
            for name, value in record.items():
                if name not in ("kind", "iteration") and isinstance(value, (int, float)):
                    self._board.add_scalar(f"{record['kind']}/{name}", value, record["iteration"])

    def close(self) -> None:
        self._csv_file.close()
        self._jsonl.close()
        if self._board is not None:
            self._board.close()


def _summary_writer(folder: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(str(folder))
