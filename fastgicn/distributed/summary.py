"""The run summary of a Ray run, `OUT/fastgicn_run.json`: per slide the status, worker, node, seconds (wall
time on its worker, waiting for the device included; `seconds_active` leaves the wait out), attempts, tiles
and forward window; the workers; totals (slides/hour, tiles/s). Written atomically at the end
of the run (and rewritten by the next run into the same directory)."""
from __future__ import annotations

import time
from pathlib import Path

from ..outputs.atomic import write_json

__all__ = ["RUN_SUMMARY_NAME", "SUMMARY_FORMAT", "RunSummary"]

RUN_SUMMARY_NAME = "fastgicn_run.json"
SUMMARY_FORMAT = "fastgicn-run-summary-1"


class RunSummary:
    """One record per slide (`record(index, **fields)`), the workers (`worker(info)`), then `write()`."""

    def __init__(self, out_dir, slides, address: str):
        self.out_dir, self.address = Path(out_dir), address
        self.started_wall = time.time()
        self.t0 = time.perf_counter()
        self.slides = [{"slide": str(s), "status": "pending", "worker": None, "node": None, "seconds": None,
                        "attempts": 0, "tiles": None, "error": None} for s in slides]
        self.workers: dict[str, dict] = {}

    def record(self, index: int, **fields) -> dict:
        self.slides[index].update(fields)
        return self.slides[index]

    def worker(self, info: dict) -> None:
        self.workers[info["worker"]] = info

    def counts(self) -> dict:
        return {k: sum(s["status"] == k for s in self.slides) for k in ("done", "skipped", "failed")}

    def to_dict(self) -> dict:
        seconds = time.perf_counter() - self.t0
        done = [s for s in self.slides if s["status"] == "done"]
        tiles = sum(s["tiles"] or 0 for s in done)
        return {"format": SUMMARY_FORMAT, "address": self.address,
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(self.started_wall)),
                "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "seconds": round(seconds, 3),
                "counts": self.counts(), "tiles": tiles,
                "tiles_per_second": round(tiles / max(seconds, 1e-9), 2),
                "slides_per_hour": round(len(done) * 3600 / max(seconds, 1e-9), 1),
                "workers": list(self.workers.values()), "slides": self.slides}

    def write(self) -> Path:
        return write_json(self.out_dir / RUN_SUMMARY_NAME, self.to_dict())
