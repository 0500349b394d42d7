"""The Ray driver: plan the cohort, start the workers, hand them slides with back-pressure, retry the slides
of a worker that died, report progress, write the run summary.

Each slide is planned on the driver exactly as a plain run plans it (`fastgicn.cohort.plan_slide`: skip it
when its outputs are complete for this fingerprint, refuse another slide under the same name), so plain and
Ray runs into one output directory resume each other. Workers (`SlideWorker`, one per GPU or `workers` CPU
actors) get at most `in_flight` slides each (2: one on the device, the next one preparing), never the
cohort. A slide whose worker died (killed actor, lost node) goes back to the front of the queue for any
worker, up to `max_retries` times; the dead worker is replaced. A slide's outputs are only ever written by the
one attempt that completes (atomic names, the report last); a failed slide leaves none.
"""
from __future__ import annotations

import copy
import sys
import time
from collections import deque
from dataclasses import dataclass, field

from ..cohort import ensure_out_dir, model_fingerprint, plan_slide, write_failures
from ..config import TileConfig
from ..errors import ConfigError
from ..naming import output_paths
from ..outputs.report import outputs_complete
from ..pipeline import check_cohort, done_lines, fingerprint_options, run_summary_line
from ..slide_job import SlideResult, clear_outputs
from .progress import ClusterProgress
from .summary import RunSummary
from .worker import SlideWorker

__all__ = ["connect", "ClusterRun", "segment_slides_ray"]

POLL_SECONDS = 1.0  # how often the driver asks the workers for their tile counts


def connect(address: str = "local", *, num_cpus: int | None = None, num_gpus: int | None = None,
            object_store_memory: int | None = None, runtime_env: dict | None = None) -> bool:
    """Start Ray on this machine (`address="local"`) or join a running cluster ("auto", "HOST:6379",
    "ray://HOST:10001"); nothing when Ray is already initialised in this process. True when this call
    started or joined it (the caller then calls `ray.shutdown()`)."""
    try:
        import ray
    except ImportError:
        raise ConfigError("--ray needs Ray, which is not installed: pip install 'fastgicn[ray]'") from None
    if ray.is_initialized():
        return False
    try:
        if address == "local":
            ray.init(num_cpus=num_cpus, num_gpus=num_gpus, object_store_memory=object_store_memory,
                     include_dashboard=False, runtime_env=runtime_env)
        else:
            ray.init(address=address, runtime_env=runtime_env)
    except (ConnectionError, RuntimeError, ValueError, ImportError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"--ray {address}: cannot join a Ray cluster there ({first}); start one with "
                          "`ray start --head`, give its address (HOST:6379 or ray://HOST:10001), or use "
                          "--ray local") from None
    return True


@dataclass
class _Worker:
    name: str
    handle: object
    ready_ref: object
    info: dict | None = None
    tasks: set = field(default_factory=set)
    progress_ref: object = None
    tiles: int = 0


class ClusterRun:
    """One run of `slides` into `out_dir` on a Ray cluster: the one this process is connected to, or else
    `connect(address, num_cpus=num_cpus)` when a slide is left to segment (and `ray.shutdown()` at the end).

    `model`: a torch module (shipped to the workers once through the object store); `workers`: how many
    actors (default: one per GPU of the cluster, or one CPU actor where it has none); `gpus`: True / False to
    force GPU or CPU actors (None: GPUs when the cluster has some); `cpus_per_worker`: the CPUs a worker
    reserves (a CPU worker's torch threads); `in_flight`: slides per worker at once; `max_retries`: how often
    a slide whose worker died is tried again; `engine`: `Engine` keyword arguments for another backend than
    the eager torch one; `runtime_env`: Ray's runtime environment for the workers. Other keywords (threads,
    handles, mpp, min_region_um2, weights, ...) go to each slide as in `segment_slides`.
    While `run()` runs, `workers` maps worker names to their actors and `running` slide indices to workers.
    """

    def __init__(self, slides, out_dir, model, config: TileConfig | None = None, *, truths=None,
                 stitch: str = "blend", force: bool = False, workers: int | None = None,
                 gpus: bool | None = None, cpus_per_worker: int = 1, in_flight: int = 2, max_retries: int = 2,
                 engine: dict | None = None, runtime_env: dict | None = None, address: str = "local",
                 num_cpus: int | None = None, log=None, progress: bool | None = None, model_fp: str | None = None, **options):
        for what, v, low in (("workers", workers, 1), ("cpus_per_worker", cpus_per_worker, 1),
                             ("in_flight", in_flight, 1), ("max_retries", max_retries, 0)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < low):
                raise ConfigError(f"{what}={v!r}: use an integer >= {low}")
        self.config = config or TileConfig()
        self.slides, self.truths, self.stems = check_cohort(slides, truths, out_dir)
        self.out_dir = ensure_out_dir(out_dir)
        self.model, self.stitch, self.force = model, stitch, force
        self.n_workers, self.gpus, self.cpus_per_worker = workers, gpus, cpus_per_worker
        self.in_flight, self.max_retries = in_flight, max_retries
        self.engine, self.runtime_env = engine, runtime_env
        self.address, self.num_cpus, self.progress = address, num_cpus, progress
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.model_fp = model_fp or model_fingerprint(model)
        options.pop("device", None)  # the worker's device comes from its kind (GPU or CPU)
        self.options = options
        self.labels = [f"[{i + 1}/{len(self.slides)}] {s}" for i, s in enumerate(self.slides)]
        self.workers: dict[str, _Worker] = {}
        self.running: dict[int, str] = {}
        self._tiles_of_lost = 0
        self._started_workers = 0

    # -- workers ------------------------------------------------------------------------------------------
    def _start_worker(self) -> _Worker:
        name = f"w{self._started_workers}"
        self._started_workers += 1
        opts = {"num_cpus": self.cpus_per_worker, "max_concurrency": self.in_flight + 2, "max_restarts": 0,
                "max_task_retries": 0}
        if self._use_gpus:
            opts["num_gpus"] = 1
        if self.runtime_env:
            opts["runtime_env"] = self.runtime_env
        handle = self._actor_class.options(**opts).remote(
            name, self._model_ref, "cuda" if self._use_gpus else "cpu", self.engine,
            None if self._use_gpus else self.cpus_per_worker)
        w = self.workers[name] = _Worker(name, handle, handle.where.remote())
        return w

    def _drop_worker(self, w: _Worker, why: str, replace: bool) -> None:

        if self.workers.pop(w.name, None) is None:
            return  # already dropped (its other slide in flight failed too)
        self._tiles_of_lost += w.tiles
        _kill(w.handle)
        if replace and self._replacements > 0:
            self._replacements -= 1
            new = self._start_worker()
            self.log(f"worker {w.name} lost ({why}); starting {new.name} in its place")
        else:
            self.log(f"worker {w.name} lost ({why})")

    def _check_ready(self) -> None:
        import ray

        for w in [w for w in self.workers.values() if w.info is None]:
            if not ray.wait([w.ready_ref], timeout=0)[0]:
                continue
            try:
                w.info = ray.get(w.ready_ref)
            except Exception as exc:  # noqa: BLE001 (it could not start: not replaced, it would fail alike)
                self._start_error = _one_line(exc)
                self._drop_worker(w, f"it could not start: {self._start_error}", replace=False)
                continue
            self.summary.worker(w.info)
            self.log(f"worker {w.name} ready on {w.info['node']} (pid {w.info['pid']}, {w.info['device']})")

    def _poll_progress(self) -> None:
        import ray
        from ray.exceptions import RayActorError

        for w in list(self.workers.values()):
            if w.info is None:
                continue
            if w.progress_ref is not None and ray.wait([w.progress_ref], timeout=0)[0]:
                try:
                    w.tiles = ray.get(w.progress_ref)["tiles"]
                except RayActorError as exc:  # lost while idle, or its slides in flight will say so too
                    self._drop_worker(w, _one_line(exc), replace=True)
                w.progress_ref = None
            if w.progress_ref is None and w.name in self.workers:
                w.progress_ref = w.handle.progress.remote()

    # -- slides -------------------------------------------------------------------------------------------
    def _done(self, i: int, record: dict) -> None:
        rep = record["report"]
        where = f" on {record['worker']}@{record['node']}"
        for line in done_lines(self.labels[i] + where, self.slides[i], rep):
            self.log(line)
        outputs = {k: str(p) for k, p in output_paths(self.out_dir, self.stems[i]).items()}
        window = record.get("forward_window")
        self.results[i] = SlideResult(str(self.slides[i]), "done", outputs, rep,
                                      forward_window=tuple(window) if window else None)
        self.summary.record(i, status="done", worker=record["worker"], node=record["node"],
                            seconds=round(record["seconds"], 3), seconds_active=rep["seconds"]["total"],
                            tiles=rep["tiles"]["segmented"],
                            forward_window=record.get("forward_window"))

    def _fail(self, i: int, msg: str, **fields) -> None:
        self.log(f"{self.labels[i]}: error: {msg}; skipped")
        self.results[i] = SlideResult(str(self.slides[i]), "failed", error=msg)
        self.failures.append((str(self.slides[i]), msg, time.strftime("%Y-%m-%dT%H:%M:%S%z")))
        self.summary.record(i, status="failed", error=msg, **fields)

    def _settle(self, ref, queue: deque) -> None:
        import ray
        from ray.exceptions import RayActorError

        w, task = self._in_flight.pop(ref)
        w.tasks.discard(ref)
        i = task["index"]
        self.running.pop(i, None)
        try:
            record = ray.get(ref)
        except RayActorError as exc:
            self._drop_worker(w, _one_line(exc), replace=True)
            report = output_paths(self.out_dir, self.stems[i])["report"]
            if outputs_complete(self.out_dir, self.stems[i], task["fingerprint"]):  # died after the report
                import json

                self._done(i, {"report": json.loads(report.read_text()), "worker": w.name,
                               "node": (w.info or {}).get("node"), "seconds": time.time() - task["sent"]})
            elif task["attempts"] > self.max_retries:
                clear_outputs(self.out_dir, self.stems[i])
                self._fail(i, f"its worker died {task['attempts']} times while segmenting it (last: "
                           f"{w.name}); check the workers' memory and logs", worker=w.name)
            else:
                self.log(f"{self.labels[i]}: worker {w.name} died while segmenting it; retried "
                         f"(attempt {task['attempts'] + 1} of {self.max_retries + 1})")
                self.summary.record(i, status="retrying")
                queue.appendleft(task)
            return
        except Exception as exc:  # noqa: BLE001 (a worker bug on this slide: reported, the others go on)
            clear_outputs(self.out_dir, self.stems[i])
            self._fail(i, f"worker {w.name}: {_one_line(exc)}", worker=w.name)
            return
        if record["status"] == "done":
            self._done(i, record)
        else:
            self._fail(i, record["error"], worker=record["worker"], node=record["node"],
                       seconds=round(record["seconds"], 3))

    def _send(self, w: _Worker, task: dict) -> None:
        task["attempts"] += 1
        task["sent"] = time.time()
        ref = w.handle.segment.remote({k: v for k, v in task.items() if k not in ("attempts", "sent")})
        self._in_flight[ref] = (w, task)
        w.tasks.add(ref)
        self.running[task["index"]] = w.name
        self.summary.record(task["index"], status="running", worker=w.name, node=w.info["node"],
                            attempts=task["attempts"])

    def run(self) -> list[SlideResult]:
        """Segment the cohort; returns a SlideResult per slide, in order (done, skipped or failed)."""

        t_run = time.perf_counter()
        n = len(self.slides)
        self.results: list[SlideResult | None] = [None] * n
        self.failures: list[tuple[str, str, str]] = []
        self.summary = RunSummary(self.out_dir, self.slides, self.address)
        queue: deque = deque()
        fp_options = fingerprint_options(self.options)
        for i, (slide, truth) in enumerate(zip(self.slides, self.truths)):
            action, value = plan_slide(self.out_dir, slide, self.stems[i], truth, self.model_fp, self.config,
                                       self.stitch, fp_options, self.force)
            if action == "skip":
                self.log(f"{self.labels[i]}: outputs complete in {self.out_dir}, skipped (use --force to "
                         "redo)")
                outputs = {k: str(p) for k, p in output_paths(self.out_dir, self.stems[i]).items()}
                self.results[i] = SlideResult(str(slide), "skipped", outputs)
                self.summary.record(i, status="skipped")
            elif action == "fail":
                self._fail(i, value)
            else:
                queue.append({"index": i, "slide": slide, "out_dir": str(self.out_dir), "config": self.config,
                              "stitch": self.stitch, "truth": truth, "fingerprint": value,
                              "model_fp": self.model_fp, "options": self.options, "attempts": 0})
        self._in_flight: dict = {}
        # Ray is started or joined only when a slide is left to segment
        joined = connect(self.address, num_cpus=self.num_cpus) if queue else False
        bar = ClusterProgress(n, "slides", enabled=self.progress)
        try:
            if queue:
                self._schedule(queue, bar)
        finally:
            for w in self.workers.values():  # the actors end with the run (a killed driver ends them too)
                _kill(w.handle)
            self.workers.clear()
            if joined:
                import ray

                ray.shutdown()
            for _, task in list(self._in_flight.values()):  # interrupted: what the killed attempts left goes
                if not outputs_complete(self.out_dir, self.stems[task["index"]], task["fingerprint"]):
                    clear_outputs(self.out_dir, self.stems[task["index"]])
            bar.close()
            path = self.summary.write()
        results = [r for r in self.results if r is not None]
        manifest = write_failures(self.out_dir, self.failures)
        self.log(run_summary_line(n, time.perf_counter() - t_run, results, manifest, self.out_dir)
                 + f"; run summary in {path}")
        return results

    def _schedule(self, queue: deque, bar: ClusterProgress) -> None:
        import ray

        if self.gpus is None:
            self._use_gpus = ray.cluster_resources().get("GPU", 0) >= 1
        else:
            self._use_gpus = bool(self.gpus)
        count = self.n_workers or (int(ray.cluster_resources().get("GPU", 0)) if self._use_gpus else 1)
        if self._use_gpus and count < 1:
            raise ConfigError("gpus=True but the Ray cluster has no GPU: add GPU nodes, or use CPU workers")
        model = self.model
        if any(p.is_cuda for p in model.parameters()):
            model = copy.deepcopy(model).cpu()  # the workers put it on their own device
        self._model_ref = ray.put(model)
        self._actor_class = ray.remote(SlideWorker)
        self._replacements = count * (self.max_retries + 1)
        self._start_error = None
        for _ in range(count):
            self._start_worker()
        last_poll = 0.0
        while queue or self._in_flight:
            self._check_ready()
            if not self.workers:
                why = self._start_error or "every worker was lost"
                while queue:
                    self._fail(queue.popleft()["index"], f"no Ray worker left to segment it ({why})")
                break
            ready_workers = [w for w in self.workers.values() if w.info is not None]
            for w in sorted(ready_workers, key=lambda w: len(w.tasks)):
                while queue and len(w.tasks) < self.in_flight:
                    self._send(w, queue.popleft())
            pending = [w.ready_ref for w in self.workers.values() if w.info is None]
            waitables = list(self._in_flight) + pending
            if not waitables:  # cannot happen with a worker left; never spin
                time.sleep(0.1)
                continue
            for ref in ray.wait(waitables, num_returns=1, timeout=0.5)[0]:
                if ref in self._in_flight:
                    self._settle(ref, queue)
            if time.perf_counter() - last_poll >= POLL_SECONDS:
                last_poll = time.perf_counter()
                self._poll_progress()
            counts = self.summary.counts()
            tiles = self._tiles_of_lost + sum(w.tiles for w in self.workers.values())
            bar.update(sum(counts.values()), counts["done"], counts["failed"], len(self.running), tiles)


def _kill(handle) -> None:
    import ray

    try:
        ray.kill(handle, no_restart=True)
    except Exception:  # noqa: BLE001, S110 (already gone)
        pass


def _one_line(exc: BaseException) -> str:
    """An exception as one line: a Ray task error as its cause (type: message), not the remote traceback."""
    cause = getattr(exc, "cause", None) or exc
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[-1] if text else ''}".rstrip(": ")


def segment_slides_ray(slides, out_dir, model, config: TileConfig | None = None, *, address: str = "local",
                       num_cpus: int | None = None, **kwargs) -> list[SlideResult]:
    """`segment_slides` on a Ray cluster: start Ray here (`address="local"`, with `num_cpus`) or join one
    ("auto", "HOST:6379", "ray://HOST:10001"; nothing to do when Ray is initialised already) once a slide
    is left to segment, run the cohort (`ClusterRun(slides, out_dir, model, config, **kwargs)`), and leave
    the cluster again. Returns a SlideResult per slide, in order."""
    return ClusterRun(slides, out_dir, model, config, address=address, num_cpus=num_cpus, **kwargs).run()
