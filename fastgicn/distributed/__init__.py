"""Many slides on many GPUs and machines with Ray (the optional `fastgicn[ray]` extra).

    from fastgicn.distributed import segment_slides_ray
    results = segment_slides_ray(slides, "out/", model, config, address="local")  # "auto", "ray://HOST:10001"

One long-lived `SlideWorker` actor per GPU (`num_gpus=1`), or `workers=N` CPU actors where the cluster has no
GPU, each loading the model and building its backend once; slides are tasks, at most two per worker at once,
so that the next slide is prepared while the current one runs and no device waits between slides. Outputs are
written by the workers into `out_dir` (storage every node sees) exactly as a plain run writes them, with the
same names, fingerprints and skip / resume rules; a bad slide is reported and skipped; the slides of a worker
that dies are retried on another one. The run ends with `OUT/fastgicn_run.json` (per slide: worker, node,
seconds, status) and, when a slide failed, the failure manifest. `ClusterRun` is the same run as an object
(its `workers` and `running` can be watched while it runs); `connect` starts or joins Ray.

Only this package imports Ray: a plain `fastgicn segment` never does.
"""
from __future__ import annotations

from .driver import ClusterRun, connect, segment_slides_ray
from .summary import RUN_SUMMARY_NAME
from .worker import SlideWorker

__all__ = ["ClusterRun", "RUN_SUMMARY_NAME", "SlideWorker", "connect", "segment_slides_ray"]
