"""SlideWorker: the Ray actor that segments slides on one device (one per GPU, or a CPU worker).

The model is loaded and its backend built once, in the constructor. The driver keeps at most two slides in
flight per worker; the actor is threaded, so the second call prepares its slide (opens it, masks tissue,
reads its first batches) while the first one runs on the device, and the first one finishes its outputs while
the second one runs: the same `SlideJob` phases as a plain `segment_slides`, with a lock for the device.
Outputs go straight into the run's output directory (shared storage) under the usual atomic names.
"""
from __future__ import annotations

import os
import socket
import threading
import time

__all__ = ["SlideWorker"]


class SlideWorker:
    """`model`: a torch module (from `create_model` / `load_model`); `device`: "cuda" for a GPU worker (Ray
    sets CUDA_VISIBLE_DEVICES to its GPU) or "cpu"; `engine`: None for the eager torch reference, or `Engine`
    keyword arguments (backend, precision, batch_size, tile_size) to build another backend once;
    `torch_threads`: intra-op threads of a CPU worker (its CPU reservation)."""

    def __init__(self, name: str, model, device: str = "cpu", engine: dict | None = None,
                 torch_threads: int | None = None):
        import torch

        from ..engine.base import resolve_device
        from ..engine.runner import as_backend

        if torch_threads:
            torch.set_num_threads(int(torch_threads))
        self.name = name
        self.device = resolve_device(device)
        if engine:
            from ..engine import Engine

            self.backend = Engine(model, device=self.device, **engine).backend
        else:
            self.backend = as_backend(model, self.device)
        for attr in ("model_name", "model_kwargs"):  # for the report, as the plain run writes it
            if hasattr(model, attr):
                setattr(self.backend, attr, getattr(model, attr))
        if not hasattr(self.backend, "model_name"):
            self.backend.model_name = type(model).__name__
        self._device_turn = threading.Lock()
        self._lock = threading.Lock()
        self._running: dict[int, object] = {}  # task index -> its SlideJob
        self._tiles_finished = 0

    def where(self) -> dict:
        """Who and where this worker is: name, node (host name and Ray node id), pid, device."""
        import ray

        ctx = ray.get_runtime_context()
        gpus = ray.get_gpu_ids() if self.device.type == "cuda" else []
        return {"worker": self.name, "node": socket.gethostname(), "node_id": ctx.get_node_id(),
                "pid": os.getpid(), "device": str(self.device), "gpus": [str(g) for g in gpus]}

    def progress(self) -> dict:
        """Tiles segmented so far by this worker (finished slides and running ones), and what is running."""
        with self._lock:
            running = {i: job.tiles_done for i, job in self._running.items()}
            return {"tiles": self._tiles_finished + sum(running.values()), "running": sorted(running)}

    def segment(self, task: dict) -> dict:
        """Segment one slide (`task`: index, slide, out_dir, config, stitch, truth, fingerprint, model_fp,
        options) and return its record: status "done" with the report, or "failed" with the one-line reason
        for what a bad slide raises. Anything else is raised (the driver reports it)."""
        from ..pipeline import failure_message
        from ..slide_job import SlideJob

        t0 = time.time()
        record = {"index": task["index"], "worker": self.name, "node": socket.gethostname(),
                  "pid": os.getpid(), "started": t0}
        job = None
        try:
            job = SlideJob(task["slide"], task["out_dir"], self.backend, task["config"], self.device,
                           truth=task["truth"], stitch=task["stitch"], fingerprint=task["fingerprint"],
                           model_fp=task["model_fp"], progress=False, **task["options"])
            with self._lock:
                self._running[task["index"]] = job
            job.prepare()
            with self._device_turn:  # the other slide in flight prepares or finishes meanwhile
                job.run()
            result = job.finish()
            record.update(status="done", report=result.report, forward_window=result.forward_window)
        except Exception as exc:
            if job is not None:
                job.abort()
            msg = failure_message(exc, task["slide"], task["out_dir"])
            if msg is None:
                raise
            record.update(status="failed", error=msg)
        finally:
            with self._lock:
                self._running.pop(task["index"], None)
                if job is not None:
                    self._tiles_finished += job.tiles_done
        record["seconds"] = time.time() - t0
        return record
